"""The client's inbox: every request names it in ``reply_to``, workers push
finished results onto it (one element per result, or a result bundle for
many requests answered by one batch), and one reader task pops them in bulk (BLMPOP)
and resolves the futures of the waiting calls, so thousands of waiting
requests need one connection and no polling.

``Inbox`` holds the waiters, which of them asked for their result to be
kept (``store``), and the results no wait() has claimed yet; its size
follows the requests in flight and the unclaimed results, never the rate;
``InboxReader`` is the task that fills it, reconnecting with backoff (after
a lost connection it sweeps stored results, since a pop whose reply was lost
took results with it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.backoff import Backoff
from common.bundle import unpack_results
from common.codec import CodecLimits
from common.envelope import Result
from common.errors import DuplicateRequest, TensorQError
from common.keys import Keys
from common.redis_conn import blocking_client
from common.settings import RedisSettings

log = logging.getLogger(__name__)

# How long a delivered result waits in memory for its wait() call.
UNCLAIMED_S = 60.0

WAKE = b""  # pushed onto our own inbox to end a blocking pop at close


@dataclass
class Inbox:
    key: str
    limits: CodecLimits
    waiters: dict[str, asyncio.Future[Result]] = field(default_factory=dict)
    # ids of waiters whose result is also stored under tq:r:<id> (store=True)
    kept: set[str] = field(default_factory=set)
    # id -> delivered at, of results no wait() has taken yet, oldest first (a
    # claim removes its entry, so this holds only what nobody has waited for)
    unclaimed: dict[str, float] = field(default_factory=dict)

    def expect(self, request_ids: Sequence[str], stored: Sequence[bool] = ()) -> None:
        """Results of these requests will arrive here: make their futures;
        ``stored``, one flag per id (default all False), says which are kept
        by id too.

        ``DuplicateRequest``, and no future made, if an id is still awaited
        here (its result not delivered: two answers would meet under one id)
        or named twice. An id whose result was delivered may be used again."""
        waiters = self.waiters
        for request_id in request_ids:
            future = waiters.get(request_id)
            if future is not None and not future.done():
                raise DuplicateRequest(
                    f"request id {request_id!r} is already in flight in this client: "
                    "wait for its result before reusing it, or choose another id",
                    request_id=request_id,
                )
        if len(request_ids) > 1 and len(set(request_ids)) < len(request_ids):
            seen: set[str] = set()
            for request_id in request_ids:
                if request_id in seen:
                    raise DuplicateRequest(
                        f"request id {request_id!r} is named twice in one submit_many",
                        request_id=request_id,
                    )
                seen.add(request_id)
        loop = asyncio.get_running_loop()
        unclaimed, kept = self.unclaimed, self.kept
        for request_id in request_ids:
            waiters[request_id] = loop.create_future()
            if unclaimed:  # a reused id: its earlier, unclaimed result is let go
                unclaimed.pop(request_id, None)
            if kept:
                kept.discard(request_id)
        if any(stored):
            self.kept.update(i for i, keep in zip(request_ids, stored, strict=True) if keep)

    def forget(self, request_ids: Iterable[str]) -> None:
        """Nobody will wait for these (not known to be queued)."""
        for request_id in request_ids:
            self.release(request_id)

    def release(self, request_id: str) -> bool:
        """Drop what is held for ``request_id`` (its wait is over); whether
        its result was to be kept by id."""
        self.waiters.pop(request_id, None)
        self.unclaimed.pop(request_id, None)
        if request_id in self.kept:
            self.kept.remove(request_id)
            return True
        return False

    def waiting(self) -> list[str]:
        return [i for i, f in self.waiters.items() if not f.done()]

    def deliver(self, blobs: Sequence[bytes]) -> None:
        """Resolve the waiters of popped elements: each one result, or a
        result bundle holding many (a batch's answers for this inbox)."""
        now = time.monotonic()
        waiters = self.waiters
        for blob in blobs:
            if blob == WAKE:
                continue
            try:
                results = unpack_results(blob, self.limits)
            except TensorQError as exc:
                log.warning("dropping unreadable inbox entry: %s", exc)
                continue
            for result in results:
                future = waiters.get(result.id)
                if future is not None and not future.done():
                    future.set_result(result)
                    self.unclaimed[result.id] = now
        self.forget_unclaimed(UNCLAIMED_S)

    def forget_unclaimed(self, older_than_s: float) -> None:
        """Drop results delivered long ago that nobody waited for (submit
        and forget); a late wait() reads them from Redis by id instead."""
        horizon = time.monotonic() - older_than_s
        unclaimed = self.unclaimed
        while unclaimed:
            request_id = next(iter(unclaimed))
            if unclaimed[request_id] > horizon:
                break
            del unclaimed[request_id]
            future = self.waiters.get(request_id)
            if future is not None and future.done():
                del self.waiters[request_id]
                self.kept.discard(request_id)

    def clear(self) -> None:
        """At close: every waiting call ends (cancelled), nothing is kept."""
        for future in self.waiters.values():
            future.cancel()
        self.waiters.clear()
        self.kept.clear()
        self.unclaimed.clear()


class InboxReader:
    """The task popping results into an ``Inbox``: ``start()`` once the
    first request is submitted, ``await stop()`` at close."""

    def __init__(
        self,
        inbox: Inbox,
        redis_settings: RedisSettings,
        keys: Keys,
        redis: Callable[[], aioredis.Redis],
        block_s: float,
        name: str,
    ) -> None:
        self.inbox = inbox
        self._settings = redis_settings
        self._keys = keys
        self._redis = redis  # the client's pool, for the wake-up push and the sweep
        self._block_s = block_s
        self._name = name
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        """Wake the blocking pop rather than cancel it mid-read; then it is
        stopped, and ``start()`` begins afresh."""
        if self._task is None:
            return
        self._closing = True
        try:
            async with self._redis().pipeline(transaction=False) as pipe:
                pipe.lpush(self.inbox.key, WAKE)
                pipe.expire(self.inbox.key, 60)
                await pipe.execute()
            await asyncio.wait_for(asyncio.shield(self._task), self._block_s + 5)
        except (RedisError, TimeoutError):
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        self._closing = False

    async def _run(self) -> None:
        conn = blocking_client(self._settings, int(self._block_s * 1000))
        backoff = Backoff()
        try:
            while not self._closing:
                try:
                    if backoff.attempts:  # a pop whose reply was lost took results with it
                        await self._sweep_stored()
                    reply: Any = await conn.blmpop(
                        self._block_s, 1, self.inbox.key, direction="RIGHT", count=1024
                    )
                    backoff.reset()
                except RedisError as exc:
                    await backoff.wait("inbox read", exc)
                    continue
                if reply:
                    self.inbox.deliver(reply[1])
                    # The next pop is sent only after the callers woken here have
                    # run and what they submit next has gone out: each wait()
                    # resumes two loop turns after its result (a shield's
                    # callback, then its task) and a submit sends from a task
                    # started in that turn, one more. A sequential caller's next
                    # request otherwise waits behind this send (about 0.06 ms).
                    for _ in range(3):
                        await asyncio.sleep(0)
        finally:
            await conn.aclose()

    async def _sweep_stored(self) -> None:
        """After a connection loss, resolve waiters whose results are stored."""
        waiting = self.inbox.waiting()
        redis = self._redis()
        for start in range(0, len(waiting), 500):
            keys = [self._keys.result(i) for i in waiting[start : start + 500]]
            stored: Any = await (
                redis.mget_nonatomic(keys)  # type: ignore[attr-defined]
                if self._keys.cluster
                else redis.mget(keys)
            )
            self.inbox.deliver([blob for blob in stored if blob])
