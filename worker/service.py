"""The batched inference loop of one worker process.

Tasks share one uvloop event loop so Redis I/O overlaps compute: a reader per
model (XREADGROUP on its own connection, decoding and validating into the
model's lane), one batcher (forms batches and hands them to the single
compute thread), and one writer (every result of a batch plus its XACK/XDEL
in one atomic script, worker/commit.py, so a kill never leaves a result
without its ack or the reverse). Beside them: reclaim of idle entries, lease renewal, the cancel
feed and the heartbeat.

Stopping is by flag, never by cancelling a blocking read (a cancelled
XREADGROUP strands the entries it was delivering): readers stop after their
current read, the batcher drains the backlog, the writer flushes, then
``run`` returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from common.aio import wait_any
from common.envelope import Arrays, Result, pack_result, peek_id_and_reply_to, unpack_request
from common.errors import InvalidInput, ProtocolError
from common.keys import CONSUMER_GROUP, HIGH, NORMAL, REQUEST_FIELD, Keys
from common.redis_conn import blocking_client
from common.settings import Settings
from worker.backoff import Backoff
from worker.batching import Assembled
from worker.commit import Committer
from worker.execution import BatchRun, DeviceExecutor, ModelFailure
from worker.feed import Feed
from worker.lanes import Lane, Outcome, Pending
from worker.metrics import worker_metrics
from worker.recovery import Entry, Recovery
from worker.registry import LoadedModel, load_model

log = logging.getLogger(__name__)


def now_ms() -> float:
    return time.time() * 1000.0


@dataclass
class Stats:
    batches: int = 0
    requests: int = 0
    rows: int = 0
    errors: int = 0
    started_ms: float = field(default_factory=now_ms)
    # per model: (done at, unix s; rows; latency ms = queued + infer), last minute
    recent: dict[str, deque[tuple[float, int, float]]] = field(default_factory=dict)

    def record(self, model: str, rows: int, latency_ms: float) -> None:
        window = self.recent.setdefault(model, deque())
        now = time.time()
        window.append((now, rows, latency_ms))
        while window and window[0][0] < now - 60:
            window.popleft()

    def last_minute(self) -> dict[str, dict[str, Any]]:
        """Per model: rows/s, latency percentiles and a 12 x 5 s sparkline of rows."""
        now = time.time()
        summary: dict[str, dict[str, Any]] = {}
        for model, window in self.recent.items():
            done = [(t, r, ms) for t, r, ms in list(window) if t >= now - 60]  # a snapshot
            latencies = sorted(ms for _, _, ms in done)
            spark = [0] * 12
            for t, rows, _ in done:
                spark[min(11, int((t - (now - 60)) // 5))] += rows
            summary[model] = {
                "rows_per_s": round(sum(r for _, r, _ in done) / 60, 2),
                "p50_ms": round(_percentile(latencies, 50), 2),
                "p99_ms": round(_percentile(latencies, 99), 2),
                "spark": spark,
            }
        return summary


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q / 100))]


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
        self.keys = Keys.of(settings.redis)
        self.executor = executor
        self.name = name
        self.device_info = device_info
        self.lanes = [
            Lane(m, self.keys.queue(m.name, priority), priority)
            for m in models
            for priority in (HIGH, NORMAL)
        ]
        self.stats = Stats()
        self.cancels = Feed(redis, self.keys, settings.worker.block_ms / 1000, self._on_control)
        self._reloads: asyncio.Queue[str] = asyncio.Queue()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader")
        self.committer = Committer(redis, self.keys, settings.redis.result_ttl_s)
        self.recovery = Recovery(
            redis, self.keys, name, self.committer, max_deliveries=settings.worker.max_deliveries
        )
        self.metrics = worker_metrics()
        self._stopping = asyncio.Event()
        self._finishing = asyncio.Event()  # drained: the side loops end
        self._work = asyncio.Event()
        self._writes: asyncio.Queue[list[Outcome] | None] = asyncio.Queue(maxsize=4)
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.failure: BaseException | None = None  # a loop died: drain, then exit non-zero
        self._parent_pid = os.getppid()

    def request_stop(self) -> None:
        if not self._stopping.is_set():
            log.info("worker %s: stop requested, draining", self.name)
            grace = self.settings.worker.drain_grace_s
            asyncio.get_running_loop().call_later(grace / 2, self._report_slow_drain, grace / 2)
        self._stopping.set()
        self._work.set()

    def _loop_ended(self, task: asyncio.Task[Any]) -> None:
        """A reader or side loop that raises has met a fault its own retries do
        not cover (or a bug): rather than serve on without it (a lane nobody
        reads, entries nobody reclaims), drain and exit non-zero so the pool
        restarts this worker."""
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        log.error("%s failed", task.get_name(), exc_info=error)
        if self.failure is None:
            self.failure = error
            log.error("worker %s: draining so the pool restarts it", self.name)
            self.request_stop()

    def _writer_ended(self, task: asyncio.Task[Any]) -> None:
        """Without its writer a worker cannot drain: exit at once. Its entries
        stay pending and its restart (same consumer name) re-reads them."""
        if task.cancelled() or task.exception() is None:
            return
        log.critical("result writer failed; exiting", exc_info=task.exception())
        logging.shutdown()
        os._exit(70)

    def _report_slow_drain(self, after_s: float) -> None:
        """Name what a drain is still waiting for, before the pool's grace
        runs out and it kills the worker."""
        waiting = []
        for task in asyncio.all_tasks():
            where = []
            awaited: Any = task.get_coro()
            while awaited is not None and hasattr(awaited, "cr_frame"):
                if awaited.cr_frame is not None:
                    where.append(f"{awaited.__qualname__}:{awaited.cr_frame.f_lineno}")
                awaited = awaited.cr_await
            if awaited is not None:
                where.append(type(awaited).__name__)
            state = f" (cancelling x{task.cancelling()})" if task.cancelling() else ""
            waiting.append(f"  {task.get_name()}{state}: {' > '.join(where)}")
        log.error(
            "worker %s still draining after %.0fs; waiting in:\n%s",
            self.name, after_s, "\n".join(sorted(waiting)),
        )  # fmt: skip

    async def run(self) -> None:
        await self._publish_models()
        for lane in self.lanes:
            await self._ensure_group(lane.queue)
        readers = [
            asyncio.create_task(self._read_loop(lane), name=f"reader of {lane.queue}")
            for lane in self.lanes
        ]
        side = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._reclaim_loop(), name="reclaim"),
            asyncio.create_task(self._lease_loop(), name="lease renewal"),
            asyncio.create_task(self.cancels.run(self._stopping), name="cancel feed"),
            asyncio.create_task(self._reload_loop(), name="reload"),
        ]
        if self.settings.worker.watch_models:
            side.append(asyncio.create_task(self._watch_loop(), name="model watch"))
        for task in readers + side:
            task.add_done_callback(self._loop_ended)
        writer = asyncio.create_task(self._write_loop(), name="writer")
        writer.add_done_callback(self._writer_ended)
        try:
            await self._batch_loop()
        except Exception as exc:  # a bug, or a fault of the device: restart, re-read
            log.error("batch loop failed", exc_info=exc)
            self.failure = self.failure or exc
            self.request_stop()
        finally:
            await self._writes.put(None)
            await writer
            await asyncio.gather(*readers, return_exceptions=True)
            # Side loops end by flag (common/aio.py says why).
            self._finishing.set()
            self._reloads.put_nowait("")
            _, stuck = await asyncio.wait(side, timeout=self.settings.redis.socket_timeout_s + 1)
            for task in stuck:
                log.warning("%s did not stop; cancelling it", task.get_name())
                task.cancel()
            await self._heartbeat(alive=False)
            self._compute.shutdown(wait=True)
            self._loader.shutdown(wait=True)
        log.info("worker %s: drained and stopped", self.name)

    # -- reading ------------------------------------------------------------

    async def _read_loop(self, lane: Lane) -> None:
        block_ms = self.settings.worker.block_ms
        conn = blocking_client(self.settings.redis, block_ms)
        backoff = Backoff()
        try:
            while not self._stopping.is_set():
                if lane.rows >= 2 * lane.max_rows:  # read ahead at most two batches
                    lane.changed.clear()
                    await wait_any(lane.changed, self._stopping)
                    continue
                try:
                    if lane.recovering:  # our own pending entries come first
                        for entry, deliveries in await self.recovery.next_own_pending(lane, conn):
                            await self._accept(lane, [entry], deliveries)
                        continue
                    reply: Any = await conn.xreadgroup(
                        CONSUMER_GROUP,
                        self.name,
                        {lane.queue: ">"},
                        count=lane.max_rows,
                        block=block_ms,
                    )
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    await self._ensure_group(lane.queue)  # Redis restarted empty
                    continue
                except RedisError as exc:
                    # A read whose reply was lost in transit left entries
                    # pending for us that we never saw: re-read them first.
                    lane.recovering = True
                    await backoff.wait(f"read {lane.queue}", exc, self._stopping)
                    continue
                backoff.reset()
                entries = reply[0][1] if reply else []
                lane.more_waiting = len(entries) >= lane.max_rows
                if entries:
                    await self._accept(lane, entries, 1)
        finally:
            lane.reader_done = True
            self._work.set()
            await conn.aclose()

    async def _accept(self, lane: Lane, entries: Sequence[Entry], deliveries: int) -> None:
        """Decode and validate delivered entries into the lane; answer what is
        invalid at once and dead-letter what cannot be answered."""
        good: list[Pending] = []
        rejected: list[Outcome] = []
        dead: list[tuple[bytes, bytes, str]] = []
        for entry_id, fields in entries:
            raw = fields.get(REQUEST_FIELD.encode()) if fields else None
            try:
                if raw is None:
                    raise ProtocolError(f"stream entry has no {REQUEST_FIELD!r} field")
                request = unpack_request(raw, self.settings.limits.codec())
                if request.reply_to is not None and not self.keys.is_inbox(request.reply_to):
                    raise InvalidInput(
                        f"reply_to {request.reply_to!r:.80} is not an inbox key "
                        f"({self.keys.inbox('<client>')})",
                        request_id=request.id,
                    )
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
            good.append(Pending(entry_id, request, rows, deliveries))
        lane.held.update(p.entry_id for p in good)
        lane.held.update(o.entry_id for o in rejected)
        if dead:
            await self.recovery.dead_letter(lane, dead)
        if rejected:
            self.stats.errors += len(rejected)
            await self._writes.put(rejected)
        good = await self._drop_answered(lane, good)
        if good:
            lane.push(good)
            self._work.set()

    async def _drop_answered(self, lane: Lane, items: list[Pending]) -> list[Pending]:
        """Check Redis for entries the cancel feed cannot vouch for: redelivered
        ones (already answered? then only ack) and ones enqueued before the
        feed started (cancelled while nobody listened?)."""
        since = self.cancels.listening_since_ms
        doubtful = [p for p in items if p.redelivered or p.enqueued_ms < since]
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
            if flags[2 * i + 1]:
                answered.append(Outcome(lane.queue, item.entry_id, item.request.id, None, b""))
            elif flags[2 * i]:
                self.cancels.add(item.request.id)
        if not answered:
            return items
        await self._writes.put(answered)
        done = {o.entry_id for o in answered}
        return [p for p in items if p.entry_id not in done]

    # -- batching and compute ----------------------------------------------

    async def _batch_loop(self) -> None:
        """Form batches and hand them to the compute thread.

        While a batch computes, the next one is queued behind it only if it is
        already full: then the device runs back to back without waiting for
        the event loop. A partial batch waits for the running one to finish
        and so collects whatever arrives meanwhile (the natural batching)."""
        loop = asyncio.get_running_loop()
        running: deque[tuple[asyncio.Future[BatchRun], Lane, LoadedModel, list[Pending]]]
        running = deque()
        turn = 0
        while True:
            ready = [lane for lane in self.lanes if lane.backlog]
            full = sorted(
                (lane for lane in ready if lane.rows >= lane.max_rows), key=lambda x: -x.priority
            )
            urgent = max((lane.priority for lane in ready), default=NORMAL)
            if running and (len(running) > 1 or not full or full[0].priority < urgent):
                computing, done_lane, done_model, batch = running.popleft()
                run = await computing
                await self._writes.put(self._outcomes(done_lane, done_model, batch, run))
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
            top = max(lane.priority for lane in candidates)  # high-priority streams first
            candidates = [lane for lane in candidates if lane.priority == top]
            lane = candidates[turn % len(candidates)]
            turn += 1
            if not running:
                await self._fill_window(lane)
            items = await self._drop_settled(lane, lane.take())
            if items:
                model = lane.model  # a reload switches lane.model for the next batch only
                inputs = [p.request.inputs for p in items]
                assembled = self.executor.assemble(model, inputs)
                computing = loop.run_in_executor(
                    self._compute, self._run_batch, model, items, inputs, assembled
                )
                running.append((computing, lane, model, items))

    async def _fill_window(self, lane: Lane) -> None:
        """Wait up to max_delay_ms for more rows while the lane's batch policy
        says it pays off (worker/window.py); an idle worker never waits."""
        delay_s = lane.model.config.max_delay_ms / 1000
        policy = self.settings.worker.batch_policy or lane.model.config.batch_policy
        adaptive = policy == "adaptive"

        def keep_waiting() -> bool:
            if lane.rows >= lane.max_rows or self._stopping.is_set():
                return False
            return lane.window.worth_waiting(lane.rows) if adaptive else lane.more_waiting

        if delay_s <= 0 or not keep_waiting():
            return
        deadline = time.monotonic() + delay_s
        while keep_waiting():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            lane.changed.clear()
            try:
                await asyncio.wait_for(lane.changed.wait(), remaining)
            except TimeoutError:
                return

    async def _drop_settled(self, lane: Lane, items: list[Pending]) -> list[Pending]:
        """Answer cancelled and expired requests without computing them (local
        checks only: no round trip on the way to the device)."""
        now = now_ms()
        keep: list[Pending] = []
        settled: list[Outcome] = []
        for item in items:
            request = item.request
            if request.id in self.cancels:
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

    def _run_batch(
        self,
        model: LoadedModel,
        items: Sequence[Pending],
        inputs: Sequence[Arrays],
        assembled: Assembled,
    ) -> BatchRun:
        """The compute thread's whole share of a batch: the forward call."""
        self._fault_hook(items)
        return self.executor.run(model, inputs, assembled)

    def _outcomes(
        self, lane: Lane, model: LoadedModel, items: Sequence[Pending], run: BatchRun
    ) -> list[Outcome]:
        """Split a computed batch per request and pack the results (event loop)."""
        rows = sum(p.rows for p in items)
        outcomes = []
        dtypes = {t.name: t.dtype for t in model.spec.outputs}
        for item, outputs in zip(items, run.per_request(model.spec), strict=True):
            request = item.request
            if isinstance(outputs, ModelFailure):
                self.stats.errors += 1
                result = Result.failure(request.id, "error", "model_error", str(outputs))
            else:
                result = Result(request.id, "ok", outputs=outputs)
            result.queued_ms = max(0.0, run.started_ms - item.enqueued_ms)
            result.infer_ms = run.infer_ms
            self.stats.record(model.name, item.rows, result.queued_ms + run.infer_ms)
            result.batch_size = rows
            result.worker = self.name
            payload = pack_result(result, dtypes)
            outcomes.append(
                Outcome(lane.queue, item.entry_id, request.id, request.reply_to, payload)
            )
        lane.window.record_batch(rows, run.infer_ms)
        if self.metrics is not None:
            waits = [max(0.0, run.started_ms - p.enqueued_ms) / 1000 for p in items]
            self.metrics.record_batch(model.name, rows, run.infer_ms / 1000, waits)
        self.stats.batches += 1
        self.stats.requests += len(items)
        self.stats.rows += rows
        return outcomes

    def _fault_hook(self, items: Sequence[Pending]) -> None:
        """Test-only: die like a segfault when a marked request is computed."""
        marker = self.settings.worker.crash_on_request_prefix
        if marker and any(p.request.id.startswith(marker) for p in items):
            log.error("fault hook: killing this worker on a marked request")
            os.kill(os.getpid(), signal.SIGKILL)

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
            reply_to = peek_id_and_reply_to(raw)[1]
        return Outcome(queue, entry_id, result.id, reply_to, pack_result(result))

    # -- writing ------------------------------------------------------------

    async def _write_loop(self) -> None:
        backoff = Backoff()
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
                    # The entries stay pending: if this never succeeds they are
                    # redelivered (restart) or reclaimed, so nothing is lost.
                    if self._stopping.is_set() and backoff.attempts > 20:
                        log.error("giving up writing %d results: %s", len(outcomes), exc)
                        break
                    await backoff.wait("write results", exc)
            for out in outcomes:
                for lane in self.lanes:
                    if lane.queue == out.queue:
                        lane.held.discard(out.entry_id)

    async def _write(self, outcomes: Sequence[Outcome]) -> None:
        """Results, inbox pushes, acks and deletes of a batch: one atomic script."""
        refused = await self.committer.commit(outcomes)
        if refused:  # NOGROUP after Redis restarted empty: the results are written
            log.warning("%d stream(s) refused the ack of %d results", refused, len(outcomes))

    # -- bookkeeping ----------------------------------------------------------

    async def _ensure_group(self, queue: str) -> None:
        try:
            await self.redis.xgroup_create(queue, CONSUMER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _publish_models(self) -> None:
        specs: dict[Any, Any] = {lane.model.name: lane.model.spec.to_json() for lane in self.lanes}
        await self.redis.hset(self.keys.models, mapping=specs)

    async def _heartbeat(self, *, alive: bool = True) -> None:
        stats = self.stats
        record = {
            **self.device_info,
            "name": self.name,
            "pid": os.getpid(),
            "alive": alive,
            "models": sorted({lane.model.name for lane in self.lanes}),
            "versions": {lane.model.name: lane.model.spec.version for lane in self.lanes},
            "batches": stats.batches,
            "requests": stats.requests,
            "rows": stats.rows,
            "errors": stats.errors,
            "mean_batch_rows": round(stats.rows / stats.batches, 2) if stats.batches else 0.0,
            "started_ms": int(stats.started_ms),
            "last_minute": stats.last_minute(),
            "last_seen_ms": int(now_ms()),
        }
        try:
            await self.redis.hset(self.keys.workers, self.name, json.dumps(record))
            if alive:  # republished: a Redis restarted without persistence forgot them
                await self._publish_models()
        except RedisError as exc:
            log.warning("heartbeat failed: %s", exc)

    async def _heartbeat_loop(self) -> None:
        while not self._finishing.is_set():
            if os.getppid() != self._parent_pid and not self._stopping.is_set():
                # Unsupervised, and a restarted pool would start a second
                # worker on this device: finish what we hold and go.
                log.error("worker %s: its pool (pid %d) is gone", self.name, self._parent_pid)
                self.request_stop()
            await self._heartbeat()
            await wait_any(self._finishing, timeout=self.settings.worker.heartbeat_s)

    async def _reclaim_loop(self) -> None:
        idle_ms = self.settings.worker.claim_idle_ms
        while not self._finishing.is_set():
            await wait_any(self._finishing, timeout=idle_ms / 2000)
            if self._stopping.is_set():  # a draining worker takes on nothing new
                return
            for lane in self.lanes:
                try:
                    await self.recovery.reclaim(lane, idle_ms)
                except RedisError as exc:
                    log.warning("reclaim on %s failed: %s", lane.queue, exc)

    async def _lease_loop(self) -> None:
        while not self._finishing.is_set():
            await wait_any(self._finishing, timeout=self.settings.worker.claim_idle_ms / 3000)
            if self._finishing.is_set():
                return
            try:
                await self.recovery.renew_leases(self.lanes)
            except RedisError as exc:
                log.warning("lease renewal failed: %s", exc)

    # -- hot reload -------------------------------------------------------------

    def _on_control(self, message: dict[str, Any]) -> None:
        served = {lane.model.name for lane in self.lanes}
        model = message.get("model")
        if message.get("op") == "reload" and isinstance(model, str) and model in served:
            self._reloads.put_nowait(model)

    async def _reload_loop(self) -> None:
        """Load the new version beside the old one (in a loader thread, warmed
        up), then switch: the running batch finishes on the old module, the
        next one runs on the new; requests are never dropped."""
        loop = asyncio.get_running_loop()
        device = str(self.executor.device)
        while True:
            name = await self._reloads.get()
            if not name:  # the worker is finishing
                return
            lanes = [lane for lane in self.lanes if lane.model.name == name]
            old = lanes[0].model
            try:
                new = await loop.run_in_executor(
                    self._loader, load_model, old.config, device, self.executor.run_one
                )
            except Exception as exc:  # a bad file must not take the old model down
                log.error(
                    "reload of %s failed, keeping version %s: %s", name, old.spec.version, exc
                )
                continue
            if new.spec.version == old.spec.version:
                log.info("reload of %s: version %s unchanged", name, old.spec.version)
                continue
            for lane in lanes:
                lane.model = new
            await self._heartbeat()  # republishes the models too; logs a Redis error
            log.info(
                "model reloaded: %s version %s -> %s", name, old.spec.version, new.spec.version
            )

    async def _watch_loop(self) -> None:
        """With ``watch_models``: reload a model whose file changed."""

        def stamp(path: Path) -> tuple[float, int]:
            try:
                stat = path.stat()
            except OSError:
                return (0.0, 0)
            return (stat.st_mtime, stat.st_size)

        seen = {lane.model.name: stamp(lane.model.config.path) for lane in self.lanes}
        while not self._finishing.is_set():
            await wait_any(self._finishing, timeout=1.0)
            for lane in self.lanes:
                now = stamp(lane.model.config.path)
                if now != seen[lane.model.name] and now != (0.0, 0):
                    seen[lane.model.name] = now
                    self._reloads.put_nowait(lane.model.name)
