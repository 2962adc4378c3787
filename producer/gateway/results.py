"""Waiting for results of async requests without a Redis connection per waiter.

``ResultWatcher`` serves ``GET /v1/requests/{id}?wait=S``: waiters park on a
future; one poll task checks every watched id in a single pipelined round
trip per tick (for requests submitted elsewhere), and ``notify`` wakes them
at once when this gateway's own request finishes.

``Followers`` follows this gateway's own async submissions: one light task
per pending request awaits it through the AsyncClient's shared inbox (which
also releases the client's waiter for it) and then notifies the watcher.
"""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.backoff import Backoff
from common.errors import TensorQError
from common.keys import Keys
from producer.client import AsyncClient


class ResultWatcher:
    def __init__(self, redis: aioredis.Redis, keys: Keys, *, interval_s: float) -> None:
        self._redis = redis
        self._keys = keys
        self._interval_s = interval_s
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def watching(self) -> int:
        return len(self._waiters)

    async def wait(self, request_id: str, timeout: float) -> None:
        """Return once ``tq:r:<id>`` probably exists, at ``timeout``, or at close."""
        if self._closed or timeout <= 0:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(request_id, []).append(future)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="result-watcher")
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            pass
        finally:
            waiting = self._waiters.get(request_id, [])
            if future in waiting:
                waiting.remove(future)
            if not waiting:
                self._waiters.pop(request_id, None)

    def notify(self, request_id: str) -> None:
        for future in self._waiters.get(request_id, ()):
            if not future.done():
                future.set_result(None)

    async def close(self) -> None:
        """Wake every waiter (they answer with the current state) and stop polling."""
        self._closed = True
        for request_id in list(self._waiters):
            self.notify(request_id)
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)

    async def _poll(self) -> None:
        backoff = Backoff()
        while self._waiters and not self._closed:
            await asyncio.sleep(self._interval_s)  # the poll period, not a synchronisation
            ids = list(self._waiters)
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for request_id in ids:
                        pipe.exists(self._keys.result(request_id))
                    found = await pipe.execute()
            except RedisError as exc:  # waiters time out on their own; keep trying
                await backoff.wait("result watcher poll", exc)
                continue
            backoff.reset()
            for request_id, exists in zip(ids, found, strict=True):
                if exists:
                    self.notify(request_id)


class Followers:
    def __init__(self, client: AsyncClient, watcher: ResultWatcher, *, timeout_s: float) -> None:
        self._client = client
        self._watcher = watcher
        self._timeout_s = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()

    def follow(self, request_id: str) -> None:
        task = asyncio.create_task(self._follow(request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow(self, request_id: str) -> None:
        try:
            # keep: the HTTP caller reads it by id, for the whole result TTL
            await self._client.wait(request_id, self._timeout_s, keep=True)
        except TensorQError:  # no result in time: the request shows as pending, then 404
            pass
        finally:
            self._watcher.notify(request_id)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
