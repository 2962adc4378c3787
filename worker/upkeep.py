"""Upkeep: what a worker does beside serving requests.

- heartbeat: every ``heartbeat_s`` a ``WorkerHeartbeat`` in ``tq:workers``
  (device, models, stats) and the model registry ``tq:models`` again (a
  Redis restarted without persistence forgot both); a worker whose pool
  died asks to stop. After a reload, the heartbeat at once, then the
  reload's answer (``ReloadAnswer``) to whoever asked for one.
- reclaim: entries idle past the visibility timeout (``claim_idle_ms``: their
  consumer is gone) are taken over with XAUTOCLAIM JUSTID, which does not
  count a delivery; the stream's reader then re-reads them as its own
  pending entries. Entries deleted while pending are dead-lettered.
- lease renewal: the idle time of every entry this worker holds is reset
  (XCLAIM JUSTID to itself), so a long batch is not reclaimed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.aio import wait_any
from common.keys import CONSUMER_GROUP, REPLY_TTL_S, Keys
from common.records import DeadLetter, ReloadAnswer, WorkerHeartbeat, now_ms
from common.settings import WorkerSettings
from worker.leases import Leases
from worker.served import ServedModels
from worker.stats import Stats
from worker.work import Stream
from worker.writer import Writer

log = logging.getLogger(__name__)

LEASE_CHUNK = 500


def _as_sent(response: Any, **kwargs: Any) -> Any:
    return response


class Upkeep:
    def __init__(
        self,
        *,
        settings: WorkerSettings,
        redis: aioredis.Redis,
        keys: Keys,
        consumer: str,
        streams: Sequence[Stream],
        served: ServedModels,
        leases: Leases,
        writer: Writer,
        stats: Stats,
        device_info: Mapping[str, Any],
        on_reclaimed: Callable[[Stream], None],
        on_orphaned: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._redis = redis
        # redis-py parses XAUTOCLAIM ... JUSTID down to the claimed ids and
        # drops the cursor and the deleted ids that ``reclaim`` walks by; only
        # upkeep sends XAUTOCLAIM, so its reply is taken as Redis sends it.
        redis.set_response_callback("XAUTOCLAIM", _as_sent)
        self._keys = keys
        self._consumer = consumer
        self._streams = list(streams)
        self._served = served
        self._leases = leases
        self._writer = writer
        self._stats = stats
        self._device_info = dict(device_info)
        self._on_reclaimed = on_reclaimed  # the stream's reader re-reads its pending entries
        self._on_orphaned = on_orphaned  # the pool that started us is gone
        self._parent_pid = os.getppid()

    # -- heartbeat --------------------------------------------------------------

    async def publish_models(self) -> None:
        await self._redis.hset(self._keys.models, mapping=self._served.registry_entries())  # type: ignore[arg-type]

    def heartbeat_record(self, *, alive: bool = True) -> WorkerHeartbeat:
        stats = self._stats
        return WorkerHeartbeat(
            name=self._consumer,
            pid=os.getpid(),
            alive=alive,
            last_seen_ms=int(now_ms()),
            started_ms=int(stats.started_ms),
            device=str(self._device_info.get("device", "")),
            device_info=self._device_info,
            models=self._served.names,
            versions=self._served.versions(),
            batches=stats.batches,
            requests=stats.requests,
            rows=stats.rows,
            errors=stats.errors,
            mean_batch_rows=stats.mean_batch_rows,
            last_minute=stats.last_minute(),
        )

    async def heartbeat(
        self, *, alive: bool = True, reply: tuple[str, ReloadAnswer] | None = None
    ) -> None:
        """Publish the heartbeat (and the models, while alive); a Redis error is
        logged. ``reply``: then push a control message's answer to its reply
        list, signed with this worker's name (after the heartbeat, so whoever
        reads the answer finds the versions it names already published)."""
        try:
            record = self.heartbeat_record(alive=alive)
            await self._redis.hset(self._keys.workers, self._consumer, record.encode())
            if alive:
                await self.publish_models()
            if reply is not None:
                key, answer = reply
                signed = dataclasses.replace(answer, worker=self._consumer).encode()
                await self._redis.rpush(key, signed)  # type: ignore[misc]
                await self._redis.expire(key, REPLY_TTL_S)
        except RedisError as exc:
            log.warning("heartbeat failed: %s", exc)

    async def heartbeat_loop(self, stopping: asyncio.Event, finishing: asyncio.Event) -> None:
        while not finishing.is_set():
            if os.getppid() != self._parent_pid and not stopping.is_set():
                # Unsupervised, and a restarted pool would start a second
                # worker on this device: finish what we hold and go.
                log.error("worker %s: its pool (pid %d) is gone", self._consumer, self._parent_pid)
                self._on_orphaned()
            await self.heartbeat()
            await wait_any(finishing, timeout=self._settings.heartbeat_s)

    # -- reclaim ----------------------------------------------------------------

    async def reclaim_loop(self, stopping: asyncio.Event, finishing: asyncio.Event) -> None:
        idle_ms = self._settings.claim_idle_ms
        while not finishing.is_set():
            await wait_any(finishing, timeout=idle_ms / 2000)
            if stopping.is_set():  # a draining worker takes on nothing new
                return
            for stream in self._streams:
                try:
                    await self.reclaim(stream, idle_ms)
                except RedisError as exc:
                    log.warning("reclaim on %s failed: %s", stream.queue, exc)

    async def reclaim(self, stream: Stream, idle_ms: int) -> int:
        """Take over entries idle past ``idle_ms``; returns how many are new to us."""
        cursor: Any = "0-0"
        claimed_total = 0
        while True:
            reply: Any = await self._redis.xautoclaim(
                stream.queue, CONSUMER_GROUP, self._consumer, idle_ms,
                start_id=cursor, count=100, justid=True,
            )  # fmt: skip
            cursor, claimed = reply[0], reply[1]
            deleted = reply[2] if len(reply) > 2 else []  # Redis 7 reports deleted entries
            if deleted:  # pending but gone from the stream: nobody can answer them
                await self._writer.dead_letter(
                    stream, [DeadLetter(b"", "entry deleted while pending", e) for e in deleted]
                )
            claimed_total += sum(1 for c in claimed if not self._leases.holds(stream.queue, c))
            if cursor in (b"0-0", "0-0"):
                break
        if claimed_total:
            log.info("reclaimed %d idle entries of %s", claimed_total, stream.queue)
            self._on_reclaimed(stream)
        return claimed_total

    # -- leases -----------------------------------------------------------------

    async def lease_loop(self, finishing: asyncio.Event) -> None:
        while not finishing.is_set():
            await wait_any(finishing, timeout=self._settings.claim_idle_ms / 3000)
            if finishing.is_set():
                return
            try:
                await self.renew_leases()
            except RedisError as exc:
                log.warning("lease renewal failed: %s", exc)

    async def renew_leases(self) -> None:
        held = self._leases.held()
        if not held:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for queue, ids in held.items():
                for start in range(0, len(ids), LEASE_CHUNK):
                    pipe.xclaim(
                        queue, CONSUMER_GROUP, self._consumer, 0,
                        ids[start : start + LEASE_CHUNK], justid=True,  # type: ignore[arg-type]
                    )  # fmt: skip
            await pipe.execute()
