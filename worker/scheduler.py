"""The scheduler: one backlog per stream, batch formation, and the hand-off
to the executor.

Readers ``add`` accepted requests. The batch loop (``run``) picks the next
backlog (high-priority streams first, round robin among equals), lets a
batch fill for up to ``max_delay_ms`` while its batch policy says waiting
pays off (worker/window.py; an idle worker never waits), answers cancelled
and expired requests without computing them, and starts the batch on the
executor. While a batch computes, the next one is queued behind it only if
it is already full: then the device runs back to back without waiting for
the event loop. A partial batch waits for the running one to finish and so
collects whatever arrives meanwhile (the natural batching). A computed
batch's outcomes go to the writer.

The backlog holds parcels (worker/work.py: a request, or a bundle's members
stacked). A batch holds whole requests, up to ``max_batch_size`` rows and up
to the model's ``max_batch_bytes`` of padded inputs
(``common.spec.PaddedSize``: a long request stops the batch before padding
the short ones past it); a parcel that does not fit whole is split between
its members, the rest waiting at the head of the backlog for the next batch.

A redelivered request (its worker died, maybe because of it) runs alone, so
a poison request cannot take its neighbours down with it again (the reader
hands a redelivered bundle over member by member).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from common.aio import wait_any
from common.envelope import Result
from common.keys import NORMAL
from common.records import now_ms
from common.spec import PaddedSize
from worker.control import ControlFeed
from worker.executor import BatchRun, Executor
from worker.grouping import BacklogColumns, batch_order
from worker.registry import LoadedModel
from worker.served import ServedModels
from worker.stats import BatchPart, Stats
from worker.window import WindowModel
from worker.work import Accepted, Batch, Outcome, Stream
from worker.writer import Writer

READ_AHEAD_BATCHES = 2  # a reader pauses while its backlog holds this many batches
# A model grouping by length reads this many times max_passed_over batches
# ahead: a request passed over the most times has had that many batches'
# worth of lengths to be matched with (measured: twice gives padding near
# that of sorting the whole backlog, README "Variable lengths").
GROUPING_READ_AHEAD_PER_PASS = 2
# A lone one-row batch runs on the event loop when its model's last one-row
# forward, scaled to its size, took under this: the loop (heartbeats, reads
# of new arrivals) waits at most about this long, and a request arriving
# meanwhile could not have computed sooner anyway, only been decoded sooner.
INLINE_MAX_MS = 5.0


@dataclass
class _Backlog:
    stream: Stream
    items: deque[Accepted] = field(default_factory=deque)
    rows: int = 0
    more_waiting: bool = False  # the last read filled its COUNT: Redis holds more
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    window: WindowModel = field(default_factory=WindowModel)
    passed: dict[str, int] = field(default_factory=dict)  # first id -> batches passed over


class Scheduler:
    def __init__(
        self,
        streams: Sequence[Stream],
        *,
        served: ServedModels,
        executor: Executor,
        writer: Writer,
        feed: ControlFeed,
        stats: Stats,
        worker: str,
        batch_policy: str = "",
    ) -> None:
        self._backlogs = {s.queue: _Backlog(s) for s in streams}
        self._served = served
        self._executor = executor
        self._writer = writer
        self._feed = feed
        self._stats = stats
        self._worker = worker
        self._policy = batch_policy  # overrides each model's own when set
        self._work = asyncio.Event()
        self._stopping = False  # stop waiting for batches to fill
        self._closed = False  # no more requests will come: drain and return

    # -- the readers' side ----------------------------------------------------

    def add(self, stream: Stream, items: Sequence[Accepted]) -> None:
        backlog = self._backlogs[stream.queue]
        backlog.items.extend(items)
        rows = sum(p.rows for p in items)
        backlog.rows += rows
        backlog.window.record_arrival(rows)
        backlog.changed.set()
        self._work.set()

    def note_more_waiting(self, stream: Stream, more: bool) -> None:
        self._backlogs[stream.queue].more_waiting = more

    def room(self, stream: Stream) -> int:
        """Rows the stream's backlog may still take before its reader pauses."""
        backlog = self._backlogs[stream.queue]
        return self._read_ahead(backlog) - backlog.rows

    async def wait_for_room(self, stream: Stream, stop: asyncio.Event) -> bool:
        """True if the stream's backlog has room for another read; else wait
        until it changes (or ``stop``) and return False."""
        backlog = self._backlogs[stream.queue]
        if self.room(stream) > 0:
            return True
        backlog.changed.clear()
        await wait_any(backlog.changed, stop)
        return False

    # -- the service's side ---------------------------------------------------

    def stop_filling(self) -> None:
        """A stop was requested: batches no longer wait to fill."""
        self._stopping = True
        self._work.set()

    def close(self) -> None:
        """The readers are done: ``run`` drains the backlog and returns."""
        self._closed = True
        self._work.set()

    async def run(self) -> None:
        running: deque[tuple[asyncio.Future[BatchRun], Batch]] = deque()
        backlogs = list(self._backlogs.values())
        turn = 0
        while True:
            ready = [b for b in backlogs if b.items]
            full = sorted(
                (b for b in ready if b.rows >= self._max_rows(b)), key=lambda b: -b.stream.priority
            )
            urgent = max((b.stream.priority for b in ready), default=NORMAL)
            if running and (len(running) > 1 or not full or full[0].stream.priority < urgent):
                computing, batch = running.popleft()
                run = await computing
                await self._finish(batch, run, idle=_idle(running, backlogs))
                continue
            if not ready:
                if self._closed:
                    return
                self._work.clear()
                if any(b.items for b in backlogs):
                    continue
                await self._work.wait()
                continue
            candidates = full if running else ready
            top = max(b.stream.priority for b in candidates)
            candidates = [b for b in candidates if b.stream.priority == top]
            backlog = candidates[turn % len(candidates)]
            turn += 1
            if not running:
                await self._fill_window(backlog)
            items = await self._drop_settled(self._take(backlog))
            if items:
                # the model looked up now: a reload switches it for the next batch only
                batch = Batch(backlog.stream, self._served[backlog.stream.model], tuple(items))
                inline = _idle(running, backlogs) and self._lone_and_short(batch)
                running.append((self._executor.start(batch, inline=inline), batch))

    def _lone_and_short(self, batch: Batch) -> bool:
        """A one-row batch of a model whose last one-row forward, scaled to
        this one's size, took under INLINE_MAX_MS (a long text after a short
        one may not): with the worker idle it may run on the event loop.
        Under load batches hold more rows and go to the compute thread, so
        reading and assembling the next overlaps the forward again."""
        if batch.rows != 1:
            return False
        expected_ms = self._backlogs[batch.stream.queue].window.lone_ms(batch.elements)
        return expected_ms is not None and expected_ms < INLINE_MAX_MS

    # -- batch formation --------------------------------------------------------

    def _max_rows(self, backlog: _Backlog) -> int:
        return self._served[backlog.stream.model].spec.max_batch_size

    def _read_ahead(self, backlog: _Backlog) -> int:
        """Rows a backlog holds before its reader pauses: more when batches
        are formed by length, so there are lengths to choose among."""
        model = self._served[backlog.stream.model]
        depth = READ_AHEAD_BATCHES
        if _groups_by_length(model):
            depth = max(depth, GROUPING_READ_AHEAD_PER_PASS * model.config.max_passed_over)
        return depth * model.spec.max_batch_size

    def _take(self, backlog: _Backlog) -> list[Accepted]:
        """The next batch: whole requests up to max_batch_size rows and
        max_batch_bytes of padded inputs (a request alone always goes: the
        reader refused any that alone passes the limit). In arrival order,
        or, for a model that groups by length with more than a batch
        waiting, in the order worker/grouping.py picks."""
        model = self._served[backlog.stream.model]
        items = backlog.items
        if not (
            backlog.rows > model.spec.max_batch_size
            and _groups_by_length(model)
            and not items[0].redelivered
        ):
            taken, rest = self._fill(model, items)
            for _ in taken:
                items.popleft()
            if rest is not None:
                items.appendleft(rest)
            if backlog.passed:  # left from grouped batches: the counts go with their parcels
                for parcel in taken:
                    count = backlog.passed.pop(parcel.ids[0], 0)
                if rest is not None:
                    backlog.passed[rest.ids[0]] = count
        else:
            taken = self._take_grouped(backlog, model)
        backlog.rows -= sum(p.rows for p in taken)
        backlog.changed.set()  # wakes a reader waiting for room
        return taken

    def _take_grouped(self, backlog: _Backlog, model: LoadedModel) -> list[Accepted]:
        items = list(backlog.items)
        passed = backlog.passed
        bound = model.config.max_passed_over
        # Requests enqueued within one batch window of each other arrived
        # together (one submit_many, one gateway bundle): none of them has a
        # claim to go before another, so taking one for its length passes
        # nobody over; only a later arrival does.
        together_ms = model.config.max_delay_ms
        near = now_ms() + (bound + 1) * backlog.window.batch_ms()  # deadlines the bound could miss
        # one pass per column: a few hundred parcels wait here while a batch computes
        sizes = np.array([p.row_size for p in items], dtype=np.int64)
        rows = np.array([p.rows for p in items], dtype=np.int64)
        arrived = np.array([p.enqueued_ms for p in items], dtype=np.float64)
        joinable = np.array([not p.redelivered for p in items], dtype=bool)
        forced = joinable & np.array(
            [passed.get(p.ids[0], 0) >= bound or (p.earliest_deadline or near) < near
             for p in items],
            dtype=bool,
        )  # fmt: skip
        tied = arrived <= arrived[0] + together_ms
        order = batch_order(
            BacklogColumns(sizes, rows, forced, joinable, tied), model.spec.max_batch_size
        )
        taken, rest = self._fill(model, [items[i] for i in order])
        chosen = order[: len(taken)]
        gone = set(chosen)
        latest = float(arrived[chosen].max())
        # passed over: left out of a batch that arrival order would have put
        # it in, for a request that arrived after it
        turn = 0
        head_rows = 0
        while turn < len(items) and head_rows + items[turn].rows <= model.spec.max_batch_size:
            head_rows += items[turn].rows
            turn += 1
        kept: deque[Accepted] = deque()
        for i, parcel in enumerate(items):
            key = parcel.ids[0]
            if i not in gone:
                if i < turn and latest > arrived[i] + together_ms:
                    passed[key] = passed.get(key, 0) + 1
                kept.append(parcel)
                continue
            count = passed.pop(key, 0)
            if rest is not None and i == chosen[-1]:
                passed[rest.ids[0]] = count
                kept.append(rest)
        backlog.items = kept
        return taken

    def _fill(
        self, model: LoadedModel, candidates: Sequence[Accepted]
    ) -> tuple[list[Accepted], Accepted | None]:
        """Take ``candidates`` in order while they fit: the parcels taken (the
        last maybe only its first members) and what is left of a split one."""
        taken: list[Accepted] = []
        rows = 0
        max_rows = model.spec.max_batch_size
        max_bytes = model.config.max_batch_bytes
        size = PaddedSize(model.spec)
        # Without variable input axes every row weighs the same: once
        # max_batch_size such rows fit, nothing more needs sizing.
        padded = any(t.variable_axes for t in model.spec.inputs)
        sizing = True
        rest: Accepted | None = None
        for head in candidates:
            if taken and (head.redelivered or taken[0].redelivered):
                break
            room = max_rows - rows
            if sizing:
                joined = size.join(head.inputs)
                if joined.nbytes > max_bytes:  # a parcel's members share their padded row size
                    room = min(room, int(max_bytes * joined.rows // joined.nbytes) - rows)
            full = head.rows > room
            if full:
                fits = bisect.bisect_right(head.offsets, room) - 1  # whole members within room
                if fits <= 0 and taken:
                    break
                if max(fits, 1) < head.count:
                    head, rest = head.split(max(fits, 1))
            if sizing:
                size = size.join(head.inputs)
                sizing = padded or size.nbytes * max_rows > max_bytes * size.rows
            rows += head.rows
            taken.append(head)
            if full:
                break
        return taken, rest

    async def _fill_window(self, backlog: _Backlog) -> None:
        """Wait up to max_delay_ms for more rows while the batch policy says it pays off."""
        config = self._served[backlog.stream.model].config
        delay_s = config.max_delay_ms / 1000
        adaptive = (self._policy or config.batch_policy) == "adaptive"
        max_rows = self._max_rows(backlog)

        def keep_waiting() -> bool:
            if backlog.rows >= max_rows or self._stopping:
                return False
            return backlog.window.worth_waiting(backlog.rows) if adaptive else backlog.more_waiting

        if delay_s <= 0 or not keep_waiting():
            return
        deadline = time.monotonic() + delay_s
        while keep_waiting():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            backlog.changed.clear()
            try:
                await asyncio.wait_for(backlog.changed.wait(), remaining)
            except TimeoutError:
                return

    async def _drop_settled(self, items: list[Accepted]) -> list[Accepted]:
        """Answer cancelled and expired requests without computing them (local
        checks only: no round trip on the way to the device; one set
        operation and one deadline comparison per parcel)."""
        now = now_ms()
        keep: list[Accepted] = []
        settled: list[Outcome] = []
        for item in items:
            cancelled = self._feed.cancelled_among(item.ids)
            earliest = item.earliest_deadline
            if not cancelled and (earliest is None or earliest >= now):
                keep.append(item)
                continue
            dropped: list[int] = []
            results: list[Result] = []
            for i, request_id in enumerate(item.ids):
                deadline = item.deadlines[i]
                if request_id in cancelled:
                    result = Result.failure(request_id, "cancelled", "cancelled",
                                            "request cancelled")  # fmt: skip
                elif deadline is not None and deadline < now:
                    result = Result.failure(request_id, "expired", "expired",
                                            "deadline passed before compute")  # fmt: skip
                else:
                    continue
                result.worker = self._worker
                dropped.append(i)
                results.append(result)
            settled.append(
                Outcome.of_results(item.stream.queue, item.entry_id, results,
                                   [item.reply_to[i] for i in dropped],
                                   [item.store[i] for i in dropped])
            )  # fmt: skip
            if len(dropped) < item.count:
                gone = set(dropped)
                keep.append(item.select([i for i in range(item.count) if i not in gone]))
        if settled:
            await self._writer.put(settled)
        return keep

    async def _finish(self, batch: Batch, run: BatchRun, *, idle: bool = False) -> None:
        outcomes = self._executor.outcomes(batch, run, self._worker)
        padded = sum(a.size for a in run.assembled.inputs)
        self._backlogs[batch.stream.queue].window.record_batch(batch.rows, run.infer_ms, padded)
        parts = [
            BatchPart(item.count, item.rows, max(0.0, run.started_ms - item.enqueued_ms))
            for item in batch.items
        ]
        variable = any(t.variable_axes for t in batch.model.spec.inputs)
        self._stats.record_batch(
            batch.model.name, parts, run.infer_ms, run.failures,
            padded=padded if variable else 0, real=batch.elements if variable else 0,
        )  # fmt: skip
        written = await self._writer.put(outcomes, idle=idle)
        if batch.items[0].redelivered:
            # The next redelivered request starts only once this answer is
            # written: if it kills the worker, this one must count as done.
            await written


def _idle(running: Sequence[object], backlogs: Sequence[_Backlog]) -> bool:
    """Nothing computing and nothing waiting: a lone batch has nothing to
    overlap with, so it may run on the event loop and its answer be written
    by the scheduler itself."""
    return not running and not any(b.items for b in backlogs)


def _groups_by_length(model: LoadedModel) -> bool:
    return model.config.group_by_length and any(t.variable_axes for t in model.spec.inputs)
