"""Stored results the caller has collected: once ``wait``/``result`` has
handed a kept (``store=True``) result of this client's own request to its
caller, nobody is likely to read ``tq:r:<id>`` again, so it need not live the
whole ``result_ttl_s``. ``Collected`` shortens those keys to
``collected_result_ttl_s`` (``EXPIRE ... LT``, or ``DEL`` for 0) from one
background task, a period's ids in one non-transactional pipeline: no round
trip on the caller's path, none per result.

Results never collected here (submit and forget, an id polled from another
client or through the gateway) keep ``result_ttl_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.keys import Keys

log = logging.getLogger(__name__)

# How long collected ids gather before one round trip sends them all.
FLUSH_PERIOD_S = 0.05
# Keys per pipeline: bounds the buffer one execute builds.
PIPELINE_KEYS = 5000
# At close, the last flush may take this long (a stalled Redis must not hold close()).
CLOSE_FLUSH_S = 2.0


class Collected:
    """``add(request_id)`` from the caller's path; ``await close()`` sends the rest.

    ``ttl_s``: the collected result TTL; 0 deletes. A TTL not shorter than
    ``result_ttl_s`` (what the result was stored with) changes nothing, so
    then nothing is sent at all (``enabled`` False)."""

    def __init__(
        self, keys: Keys, redis: Callable[[], aioredis.Redis], ttl_s: int, result_ttl_s: int
    ) -> None:
        self._keys = keys
        self._redis = redis  # the client's current pool
        self._ttl = ttl_s
        self.enabled = ttl_s < result_ttl_s
        self._ids: list[str] = []
        self._flusher: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None  # set at close: the flusher stops waiting

    @property
    def queued(self) -> int:
        """Ids collected and not yet sent."""
        return len(self._ids)

    def add(self, request_id: str) -> None:
        if not self.enabled:
            return
        self._ids.append(request_id)
        if self._flusher is None or self._flusher.done():
            self._wake = asyncio.Event()  # made here: of the loop the flusher runs on
            self._flusher = asyncio.get_running_loop().create_task(
                self._run(self._wake), name="collected-results"
            )

    async def close(self) -> None:
        """Send what is queued (within ``CLOSE_FLUSH_S``), then stop."""
        task, wake = self._flusher, self._wake
        if task is None or wake is None:
            return
        wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), CLOSE_FLUSH_S)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._flusher = None
        self._ids.clear()  # what could not be sent keeps result_ttl_s

    async def _run(self, wake: asyncio.Event) -> None:
        while self._ids:
            if not wake.is_set():
                # the batching period, not a synchronisation: ids gather meanwhile
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), FLUSH_PERIOD_S)
            ids, self._ids = self._ids, []
            try:
                await self._send(ids)
            except RedisError as exc:  # those results keep result_ttl_s: bounded all the same
                log.debug("could not shorten %d collected results: %s", len(ids), exc)

    async def _send(self, ids: Sequence[str]) -> None:
        # One command per key: on Redis Cluster the keys lie in many slots, and
        # redis-py's cluster pipeline sends each node its share.
        redis = self._redis()
        for start in range(0, len(ids), PIPELINE_KEYS):
            async with redis.pipeline(transaction=False) as pipe:
                for request_id in ids[start : start + PIPELINE_KEYS]:
                    key = self._keys.result(request_id)
                    if self._ttl:
                        pipe.expire(key, self._ttl, lt=True)  # never lengthens a shorter TTL
                    else:
                        pipe.delete(key)
                await pipe.execute(raise_on_error=False)
