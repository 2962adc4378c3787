"""The batched inference loop of one worker process.

Three kinds of tasks share one uvloop event loop so Redis I/O overlaps
compute: a reader per model (XREADGROUP on its own connection, decoding and
validating into the model's backlog), one batcher (forms a batch, runs it in
the single compute thread), and one writer (every result of a batch plus its
XACK/XDEL in one pipelined round trip). A reclaimer takes over entries other
consumers left pending too long; a heartbeat publishes stats.

Stopping is by flag, never by cancelling a blocking read (a cancelled
XREADGROUP strands the entries it was delivering): readers stop after their
current read, the batcher drains the backlog, the writer flushes, then
``run`` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from common.envelope import Request, Result, pack_result, unpack_request
from common.errors import InvalidInput, ProtocolError
from common.keys import CONSUMER_GROUP, REQUEST_FIELD, Keys
from common.redis_conn import blocking_client
from common.settings import Settings
from worker.execution import DeviceExecutor, ModelFailure
from worker.registry import LoadedModel

log = logging.getLogger(__name__)

_CANCEL_MEMORY_S = 3600.0  # as long as a cancel key lives


def now_ms() -> float:
    return time.time() * 1000.0


@dataclass
class Pending:
    """A delivered stream entry waiting for its batch."""

    entry_id: bytes
    request: Request
    rows: int
    redelivered: bool = False

    @property
    def enqueued_ms(self) -> float:
        return float(self.entry_id.split(b"-", 1)[0])


@dataclass
class Outcome:
    """A result ready to be written, and the entry it acknowledges."""

    queue: str
    entry_id: bytes
    request_id: str
    reply_to: str | None
    payload: bytes


@dataclass
class Lane:
    """One model's backlog of delivered, validated requests."""

    model: LoadedModel
    queue: str
    backlog: deque[Pending] = field(default_factory=deque)
    rows: int = 0
    more_waiting: bool = False  # the last read filled its COUNT: Redis holds more
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    reader_done: bool = False

    def push(self, items: Sequence[Pending]) -> None:
        self.backlog.extend(items)
        self.rows += sum(p.rows for p in items)
        self.changed.set()

    def take(self, max_rows: int) -> list[Pending]:
        taken: list[Pending] = []
        rows = 0
        while self.backlog and (not taken or rows + self.backlog[0].rows <= max_rows):
            item = self.backlog.popleft()
            rows += item.rows
            taken.append(item)
        self.rows -= rows
        self.changed.set()  # wakes a reader waiting for room
        return taken


@dataclass
class Stats:
    batches: int = 0
    requests: int = 0
    rows: int = 0
    errors: int = 0
    started_ms: float = field(default_factory=now_ms)


class WorkerService:
    """Serve ``models`` on ``executor`` until ``request_stop``."""

    def __init__(
        self,
        *,
        settings: Settings,
        redis: aioredis.Redis,
        models: Sequence[LoadedModel],
        executor: DeviceExecutor,
        name: str,
        device_info: dict[str, Any],
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.redis.prefix)
        self.executor = executor
        self.name = name
        self.device_info = device_info
        self.lanes = [Lane(m, self.keys.queue(m.name)) for m in models]
        self.stats = Stats()
        self._stopping = asyncio.Event()
        self._work = asyncio.Event()
        self._writes: asyncio.Queue[list[Outcome] | None] = asyncio.Queue(maxsize=4)
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._cancelled: dict[str, float] = {}  # request id -> forget-after (monotonic)
        self._listening_since_ms = float("inf")  # Redis time the cancel feed started

    def request_stop(self) -> None:
        if not self._stopping.is_set():
            log.info("worker %s: stop requested, draining", self.name)
        self._stopping.set()
        self._work.set()

    async def run(self) -> None:
        await self._publish_models()
        for lane in self.lanes:
            await self._ensure_group(lane.queue)
        readers = [asyncio.create_task(self._read_loop(lane)) for lane in self.lanes]
        side = [
            asyncio.create_task(self._heartbeat_loop()),
            asyncio.create_task(self._reclaim_loop()),
            asyncio.create_task(self._listen_cancels()),
        ]
        writer = asyncio.create_task(self._write_loop())
        try:
            await self._batch_loop()
        finally:
            await self._writes.put(None)
            await writer
            await asyncio.gather(*readers, return_exceptions=True)
            for task in side:
                task.cancel()
            await asyncio.gather(*side, return_exceptions=True)
            await self._heartbeat(alive=False)
            self._compute.shutdown(wait=True)
        log.info("worker %s: drained and stopped", self.name)

    # -- reading ------------------------------------------------------------

    async def _read_loop(self, lane: Lane) -> None:
        block_ms = self.settings.worker.block_ms
        count = lane.model.spec.max_batch_size
        conn = blocking_client(self.settings.redis, block_ms)
        backoff = _Backoff()
        # Entries this consumer had in flight before a restart come first.
        start_id = "0"
        try:
            while not self._stopping.is_set():
                if lane.rows >= count:  # read ahead at most one batch
                    lane.changed.clear()
                    await self._wait_either(lane.changed)
                    continue
                try:
                    reply: Any = await conn.xreadgroup(
                        CONSUMER_GROUP,
                        self.name,
                        {lane.queue: start_id},
                        count=count,
                        block=None if start_id == "0" else block_ms,
                    )
                except ResponseError as exc:
                    if "NOGROUP" in str(exc):  # Redis restarted without persistence
                        await self._ensure_group(lane.queue)
                        continue
                    raise
                except RedisError as exc:
                    await backoff.wait(f"read {lane.queue}", exc, self._stopping)
                    continue
                backoff.reset()
                entries = reply[0][1] if reply else []
                if start_id == "0":
                    if not entries:
                        start_id = ">"
                        continue
                    start_id = entries[-1][0].decode()  # page through our own pending
                lane.more_waiting = start_id == ">" and len(entries) >= count
                await self._accept(lane, entries, redelivered=start_id != ">")
        finally:
            lane.reader_done = True
            self._work.set()
            await conn.aclose()

    async def _accept(
        self, lane: Lane, entries: Sequence[tuple[bytes, dict[bytes, bytes]]], redelivered: bool
    ) -> None:
        good: list[Pending] = []
        rejected: list[Outcome] = []
        dead: list[tuple[bytes, bytes, str]] = []
        for entry_id, fields in entries:
            raw = fields.get(REQUEST_FIELD.encode()) if fields else None
            try:
                if raw is None:
                    raise ProtocolError(f"stream entry has no {REQUEST_FIELD!r} field")
                request = unpack_request(raw, self.settings.limits.codec())
                if request.model != lane.model.name:
                    raise InvalidInput(
                        f"request for model {request.model!r} on the queue of {lane.model.name!r}",
                        request_id=request.id,
                    )
                rows = lane.model.spec.check_inputs(request.inputs, request_id=request.id)
            except ProtocolError as exc:
                if exc.request_id:
                    result = Result.failure(exc.request_id, "error", exc.code, exc.message)
                    rejected.append(self._outcome(lane.queue, entry_id, None, result, raw))
                else:
                    dead.append((entry_id, raw or b"", exc.message))
                continue
            good.append(Pending(entry_id, request, rows, redelivered))
        good = await self._drop_answered(lane, good)
        if dead:
            await self._dead_letter(lane.queue, lane.model.name, dead)
        if rejected:
            self.stats.errors += len(rejected)
            await self._writes.put(rejected)
        if good:
            lane.push(good)
            self._work.set()

    async def _drop_answered(self, lane: Lane, items: list[Pending]) -> list[Pending]:
        """Check Redis for entries the pub/sub feed cannot vouch for: redelivered
        ones (already answered? then just ack) and ones enqueued before our
        cancel subscription started (cancelled while we were not listening?)."""
        doubtful = [p for p in items if p.redelivered or p.enqueued_ms < self._listening_since_ms]
        if not doubtful:
            return items
        async with self.redis.pipeline(transaction=False) as pipe:
            for item in doubtful:
                pipe.exists(self.keys.cancelled(item.request.id))
                pipe.exists(self.keys.result(item.request.id))
            try:
                flags = await pipe.execute()
            except RedisError as exc:  # compute anyway: a duplicate beats a loss
                log.warning("cancel/result check failed: %s", exc)
                return items
        answered: list[Outcome] = []
        for i, item in enumerate(doubtful):
            if flags[2 * i + 1]:  # a result exists: ack without recomputing
                answered.append(Outcome(lane.queue, item.entry_id, item.request.id, None, b""))
            elif flags[2 * i]:
                self._cancelled[item.request.id] = time.monotonic() + _CANCEL_MEMORY_S
        if answered:
            done = {o.entry_id for o in answered}
            items = [p for p in items if p.entry_id not in done]
            await self._writes.put(answered)
        return items

    async def _listen_cancels(self) -> None:
        """Keep ``_cancelled`` fed from the cancel channel, resubscribing on loss."""
        backoff = _Backoff()
        while not self._stopping.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.keys.cancel_channel)
                seconds, micros = await self.redis.time()
                self._listening_since_ms = seconds * 1000 + micros / 1000
                backoff.reset()
                while not self._stopping.is_set():
                    message = await pubsub.get_message(timeout=self.settings.worker.block_ms / 1000)
                    if message is not None:
                        request_id = message["data"].decode(errors="replace")
                        self._cancelled[request_id] = time.monotonic() + _CANCEL_MEMORY_S
                    self._forget_old_cancels()
            except RedisError as exc:
                # Until resubscribed, every entry counts as doubtful.
                self._listening_since_ms = float("inf")
                await backoff.wait("cancel subscription", exc, self._stopping)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _forget_old_cancels(self) -> None:
        now = time.monotonic()
        if len(self._cancelled) > 1000 or (self._cancelled and now > min(self._cancelled.values())):
            self._cancelled = {k: t for k, t in self._cancelled.items() if t > now}

    async def _dead_letter(
        self, queue: str, model: str, entries: Sequence[tuple[bytes, bytes, str]]
    ) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id, raw, reason in entries:
                pipe.xadd(self.keys.dead(model), {"req": raw, "reason": reason, "entry": entry_id})
                pipe.xack(queue, CONSUMER_GROUP, entry_id)
                pipe.xdel(queue, entry_id)
            await pipe.execute()
        log.warning("dead-lettered %d unreadable entries of %s", len(entries), queue)

    # -- batching and compute ----------------------------------------------

    async def _batch_loop(self) -> None:
        """Form batches and hand them to the compute thread.

        While a batch computes, the next one is queued behind it only if it is
        already full: then the device runs back to back without waiting for
        the event loop. A partial batch waits for the running one to finish
        and so collects whatever arrives meanwhile (the natural batching)."""
        loop = asyncio.get_running_loop()
        running: deque[asyncio.Future[list[Outcome]]] = deque()
        turn = 0
        while True:
            ready = [lane for lane in self.lanes if lane.backlog]
            full = [lane for lane in ready if lane.rows >= lane.model.spec.max_batch_size]
            if running and (len(running) > 1 or not full):
                await self._writes.put(await running.popleft())
                continue
            if not ready:
                if self._stopping.is_set() and all(lane.reader_done for lane in self.lanes):
                    return
                self._work.clear()
                if any(lane.backlog for lane in self.lanes):
                    continue
                await self._work.wait()
                continue
            candidates = full if running else ready
            lane = candidates[turn % len(candidates)]
            turn += 1
            if not running:
                await self._fill_window(lane)
            items = lane.take(lane.model.spec.max_batch_size)
            items = await self._drop_settled(lane, items)
            if items:
                running.append(
                    loop.run_in_executor(self._compute, self._compute_batch, lane, items)
                )

    async def _fill_window(self, lane: Lane) -> None:
        """Wait up to max_delay_ms for more rows, but only while Redis is known
        to hold more: an idle worker runs a lone request at once."""
        max_rows = lane.model.spec.max_batch_size
        delay_s = lane.model.config.max_delay_ms / 1000
        if delay_s <= 0 or lane.rows >= max_rows or not lane.more_waiting:
            return
        deadline = time.monotonic() + delay_s
        while lane.rows < max_rows and lane.more_waiting and not self._stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            lane.changed.clear()
            try:
                await asyncio.wait_for(lane.changed.wait(), remaining)
            except TimeoutError:
                return

    async def _drop_settled(self, lane: Lane, items: list[Pending]) -> list[Pending]:
        """Answer cancelled and expired requests without computing them.

        Local checks only: cancellations arrive by pub/sub (``_listen_cancels``)
        and entries older than the subscription were checked by the reader."""
        now = now_ms()
        keep: list[Pending] = []
        settled: list[Outcome] = []
        for item in items:
            request = item.request
            if request.id in self._cancelled:
                result = Result.failure(request.id, "cancelled", "cancelled", "request cancelled")
            elif request.deadline_ms is not None and request.deadline_ms < now:
                result = Result.failure(
                    request.id, "expired", "expired", "deadline passed before compute"
                )
            else:
                keep.append(item)
                continue
            settled.append(self._outcome(lane.queue, item.entry_id, request.reply_to, result))
        if settled:
            await self._writes.put(settled)
        return keep

    def _compute_batch(self, lane: Lane, items: list[Pending]) -> list[Outcome]:
        started = now_ms()
        model = lane.model
        t0 = time.perf_counter()
        per_request = self.executor.run_batch(model, [p.request.inputs for p in items])
        infer_ms = (time.perf_counter() - t0) * 1000
        rows = sum(p.rows for p in items)
        outcomes = []
        dtypes = {t.name: t.dtype for t in model.spec.outputs}
        for item, outputs in zip(items, per_request, strict=True):
            request = item.request
            if isinstance(outputs, ModelFailure):
                self.stats.errors += 1
                result = Result.failure(request.id, "error", "model_error", str(outputs))
            else:
                result = Result(request.id, "ok", outputs=outputs)
            result.queued_ms = max(0.0, started - item.enqueued_ms)
            result.infer_ms = infer_ms
            result.batch_size = rows
            result.worker = self.name
            outcomes.append(
                Outcome(
                    lane.queue,
                    item.entry_id,
                    request.id,
                    request.reply_to,
                    pack_result(result, dtypes),
                )
            )
        self.stats.batches += 1
        self.stats.requests += len(items)
        self.stats.rows += rows
        return outcomes

    def _outcome(
        self,
        queue: str,
        entry_id: bytes,
        reply_to: str | None,
        result: Result,
        raw: bytes | None = None,
    ) -> Outcome:
        result.worker = self.name
        if reply_to is None and raw is not None:
            reply_to = _peek_reply_to(raw)
        return Outcome(queue, entry_id, result.id, reply_to, pack_result(result))

    # -- writing ------------------------------------------------------------

    async def _write_loop(self) -> None:
        backoff = _Backoff()
        while True:
            outcomes = await self._writes.get()
            if outcomes is None:
                return
            while True:
                try:
                    await self._write(outcomes)
                    backoff.reset()
                    break
                except RedisError as exc:
                    # Unacked entries stay pending: if this never succeeds
                    # another worker reclaims them, so nothing is lost.
                    if self._stopping.is_set() and backoff.attempts > 20:
                        log.error("giving up writing %d results: %s", len(outcomes), exc)
                        break
                    await backoff.wait("write results", exc, None)

    async def _write(self, outcomes: Sequence[Outcome]) -> None:
        ttl = self.settings.redis.result_ttl_s
        by_queue: dict[str, list[bytes]] = {}
        by_inbox: dict[str, list[bytes]] = {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for out in outcomes:
                if out.payload:
                    pipe.set(self.keys.result(out.request_id), out.payload, ex=ttl)
                    if out.reply_to:
                        by_inbox.setdefault(out.reply_to, []).append(out.payload)
                by_queue.setdefault(out.queue, []).append(out.entry_id)
            for inbox, payloads in by_inbox.items():
                pipe.lpush(inbox, *payloads)
                pipe.expire(inbox, ttl)  # an abandoned inbox disappears
            for queue, ids in by_queue.items():
                pipe.xack(queue, CONSUMER_GROUP, *ids)
                pipe.xdel(queue, *ids)  # streams keep acked entries otherwise
            await pipe.execute()

    # -- bookkeeping ----------------------------------------------------------

    async def _ensure_group(self, queue: str) -> None:
        try:
            await self.redis.xgroup_create(queue, CONSUMER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _publish_models(self) -> None:
        await self.redis.hset(
            self.keys.models,
            mapping={lane.model.name: lane.model.spec.to_json() for lane in self.lanes},
        )

    async def _heartbeat(self, *, alive: bool = True) -> None:
        stats = self.stats
        record = {
            **self.device_info,
            "name": self.name,
            "pid": os.getpid(),
            "alive": alive,
            "models": [lane.model.name for lane in self.lanes],
            "batches": stats.batches,
            "requests": stats.requests,
            "rows": stats.rows,
            "errors": stats.errors,
            "mean_batch_rows": round(stats.rows / stats.batches, 2) if stats.batches else 0.0,
            "started_ms": int(stats.started_ms),
            "last_seen_ms": int(now_ms()),
        }
        try:
            await self.redis.hset(self.keys.workers, self.name, json.dumps(record))
        except RedisError as exc:
            log.warning("heartbeat failed: %s", exc)

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._heartbeat()
            await asyncio.sleep(self.settings.worker.heartbeat_s)

    async def _reclaim_loop(self) -> None:
        """Take over entries idle past the visibility timeout (dead consumers)."""
        idle_ms = self.settings.worker.claim_idle_ms
        while True:
            await asyncio.sleep(idle_ms / 2000)
            for lane in self.lanes:
                try:
                    await self._reclaim(lane, idle_ms)
                except RedisError as exc:
                    log.warning("reclaim on %s failed: %s", lane.queue, exc)

    async def _reclaim(self, lane: Lane, idle_ms: int) -> None:
        cursor: bytes | str = "0-0"
        while not self._stopping.is_set():
            reply = await self.redis.xautoclaim(
                lane.queue, CONSUMER_GROUP, self.name, idle_ms, start_id=cursor, count=100
            )
            cursor, claimed = reply[0], reply[1]
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:
                log.warning("%d pending entries of %s were deleted", len(deleted), lane.queue)
                async with self.redis.pipeline(transaction=False) as pipe:
                    for entry_id in deleted:
                        pipe.xack(lane.queue, CONSUMER_GROUP, entry_id)
                    await pipe.execute()
            if claimed:
                log.info("reclaimed %d entries of %s", len(claimed), lane.queue)
                await self._accept(lane, claimed, redelivered=True)
            if cursor in (b"0-0", "0-0"):
                return

    async def _wait_either(self, event: asyncio.Event) -> None:
        """Wait for ``event`` or the stop flag, whichever comes first."""
        waiters = [
            asyncio.ensure_future(event.wait()),
            asyncio.ensure_future(self._stopping.wait()),
        ]
        _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()


class _Backoff:
    """Exponential backoff with full jitter, for reconnect loops."""

    def __init__(self, base: float = 0.05, cap: float = 5.0) -> None:
        self.base, self.cap, self.attempts = base, cap, 0

    def reset(self) -> None:
        self.attempts = 0

    async def wait(self, what: str, exc: Exception, stop: asyncio.Event | None) -> None:
        import random

        delay = random.uniform(0, min(self.cap, self.base * 2**self.attempts))
        self.attempts += 1
        log.warning("%s failed (%s); retry %d in %.2fs", what, exc, self.attempts, delay)
        if stop is None:
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)


def _peek_reply_to(raw: bytes) -> str | None:
    """reply_to of a request that failed validation, if its map is readable."""
    import msgpack

    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception:
        return None
    reply_to = body.get("reply_to") if isinstance(body, dict) else None
    return reply_to if isinstance(reply_to, str) else None
