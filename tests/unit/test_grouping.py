"""Length-aware batch formation (worker/grouping.py and the scheduler's use
of it): the order it picks, that every request still gets its own rows back,
the pass-over bound, near deadlines, priority, max_batch_bytes, and that
light load and uniform lengths keep arrival order."""

from __future__ import annotations

import numpy as np
import pytest

from common.envelope import Request
from common.records import now_ms
from tests.unit.test_worker_parts import (
    HIGH_STREAM,
    NORMAL_STREAM,
    RecordingWriter,
    Shapes,
    drain,
    scheduler_for,
    small_model,
)
from worker.grouping import BacklogColumns, Candidate, batch_order, padding_share
from worker.registry import LoadedModel
from worker.scheduler import Scheduler
from worker.work import Accepted, Stream


def sized(*sizes: int, forced: tuple[int, ...] = ()) -> BacklogColumns:
    return BacklogColumns.of([Candidate(s, 1, i in forced) for i, s in enumerate(sizes)])


def test_the_oldest_goes_first_with_the_nearest_lengths() -> None:
    order = batch_order(sized(50, 10, 200, 48, 52, 11, 201, 49), 4)
    assert order[0] == 0
    assert sorted(order[:4]) == [0, 3, 4, 7]  # 48..52 around the oldest's 50


def test_uniform_lengths_keep_arrival_order() -> None:
    assert batch_order(sized(*[30] * 10), 4)[:4] == [0, 1, 2, 3]


def test_forced_requests_join_whatever_their_length() -> None:
    order = batch_order(sized(50, 10, 200, 48, 52, 11, forced=(2,)), 4)
    assert order[:2] == [0, 2]  # then padded to 200 anyway: the nearest below it
    assert sorted(order[2:4]) == [3, 4]


def test_a_request_that_runs_alone_is_never_picked_to_join() -> None:
    candidates = [Candidate(50, 1, False), Candidate(50, 1, False, joinable=False)]
    candidates += [Candidate(90, 1, False)]
    assert batch_order(BacklogColumns.of(candidates), 2) == [0, 2]


def test_the_least_wasteful_run_is_chosen() -> None:
    # oldest 100: 97, 98, 99 waste 6 below it; 104..106 would pad 100 up: waste 9
    order = batch_order(sized(100, 104, 105, 106, 97, 98, 99, 5), 4)
    assert sorted(order[:4]) == [0, 4, 5, 6]


def test_requests_that_arrived_together_are_taken_by_length_alone() -> None:
    """The oldest arrived with others (one submit_many): none of them is
    forced in, the batch is the least wasteful run holding one of them."""
    tied = [Candidate(s, 1, False, tied=True) for s in (50, 10, 200, 11, 12)]
    assert sorted(batch_order(BacklogColumns.of(tied), 3)[:3]) == [1, 3, 4]
    # a later arrival (not tied) may join, but one of the oldest arrivals goes in
    later = [Candidate(50, 1, False), Candidate(49, 1, False, tied=True)]
    later += [Candidate(s, 1, False) for s in (100, 101, 102)]
    order = batch_order(BacklogColumns.of(later), 3)[:3]
    assert {0, 1} & set(order) and sorted(order) != [2, 3, 4]


def test_padding_share() -> None:
    assert padding_share(150, 100) == 1.5
    assert padding_share(0, 0) == 1.0


# -- through the scheduler ----------------------------------------------------


# One clock reading for every request made here: requests made at the same
# ``at`` share their enqueue time however slowly this box creates them.
START_MS = int(now_ms())


def request(
    stream: Stream, request_id: str, length: int, *, at: int = 0, **kwargs: object
) -> Accepted:
    """A one-row request of ``length``, enqueued ``at`` ms after START_MS
    (requests enqueued within the model's max_delay_ms of each other arrived
    together)."""
    x = np.full((1, length), float(length), np.float32)
    entry_id = f"{START_MS + at}-0".encode()
    return Accepted.single(stream, entry_id, Request(request_id, "m", {"x": x}, **kwargs), 1)  # type: ignore[arg-type]


def variable_model(forward: Shapes, max_batch_size: int = 8, **config: object) -> LoadedModel:
    return small_model(forward, max_batch_size=max_batch_size, shape=(-1,), **config)


def take(scheduler: Scheduler, stream: Stream = NORMAL_STREAM) -> list[Accepted]:
    """The next batch the scheduler would form (its private step, driven by
    hand so that requests can arrive between batches)."""
    return scheduler._take(scheduler._backlogs[stream.queue])


async def test_mixed_lengths_are_batched_by_length_and_each_gets_its_own_rows() -> None:
    rng = np.random.default_rng(5)
    lengths = [int(n) for n in rng.integers(1, 65, 64)]
    grouped, fifo = Shapes(lambda x: x * 2), Shapes(lambda x: x * 2)
    for forward, on in ((grouped, True), (fifo, False)):
        writer = RecordingWriter()
        scheduler = scheduler_for(variable_model(forward, group_by_length=on), writer)
        scheduler.add(
            NORMAL_STREAM, [request(NORMAL_STREAM, f"r{i}", n) for i, n in enumerate(lengths)]
        )
        await drain(scheduler)
        results = {r.id: r for r in writer.results()}
        assert sorted(results) == sorted(f"r{i}" for i in range(64))  # one answer each
        for i, n in enumerate(lengths):
            y = results[f"r{i}"].outputs["y"]
            np.testing.assert_array_equal(y, np.full((1, n), 2.0 * n, np.float32))  # cut back
    real = sum(lengths)
    share = {
        name: padding_share(sum(r * n for r, n in forward.shapes), real)
        for name, forward in (("grouped", grouped), ("fifo", fifo))
    }
    assert share["fifo"] > 1.5  # arrival order pads most rows to near 64
    assert share["grouped"] < 1.25, share
    assert sum(r for r, _ in grouped.shapes) == 64
    # nothing starves: the oldest request is in the first batch
    assert grouped.shapes[0][1] >= lengths[0]


@pytest.mark.parametrize(("bound", "batch"), [(1, 3), (2, 4), (100, 5)])
async def test_a_long_request_is_passed_over_at_most_the_bound(bound: int, batch: int) -> None:
    """Four old requests of far-apart lengths, then the long one, then short
    ones matching each old one: batches pair an old request with younger
    ones of its length. From the 2nd batch on, arrival order would take the
    long one; it is left out ``bound`` times, then goes in whatever its
    length (or, the bound not binding, once it is the oldest: the 5th)."""
    scheduler = scheduler_for(
        variable_model(Shapes(lambda x: x), max_batch_size=4, max_passed_over=bound),
        RecordingWriter(),
    )
    old = [10, 100, 200, 300]
    scheduler.add(NORMAL_STREAM, [request(NORMAL_STREAM, f"o{n}", n) for n in old])
    scheduler.add(NORMAL_STREAM, [request(NORMAL_STREAM, "long", 1000, at=100)])
    young = [request(NORMAL_STREAM, f"y{n}-{k}", n, at=200) for n in old for k in range(3)]
    scheduler.add(NORMAL_STREAM, young)
    batches = []
    while not batches or "long" not in batches[-1]:
        batches.append([p.ids[0] for p in take(scheduler)])
    assert len(batches) == batch, batches
    assert batches[0] == ["o10", "y10-0", "y10-1", "y10-2"]


async def test_max_passed_over_zero_is_arrival_order() -> None:
    scheduler = scheduler_for(
        variable_model(Shapes(lambda x: x), max_batch_size=2, max_passed_over=0),
        RecordingWriter(),
    )
    lengths = [5, 90, 6, 91, 7, 92]
    scheduler.add(
        NORMAL_STREAM, [request(NORMAL_STREAM, f"r{i}", n) for i, n in enumerate(lengths)]
    )
    assert [p.ids[0] for p in take(scheduler)] == ["r0", "r1"]


async def test_a_near_deadline_goes_before_its_length_would_let_it() -> None:
    scheduler = scheduler_for(
        variable_model(Shapes(lambda x: x), max_batch_size=2), RecordingWriter()
    )
    backlog = scheduler._backlogs[NORMAL_STREAM.queue]
    for _ in range(4):
        backlog.window.record_batch(2, 1000.0)  # batches take a second: 5 s is near
    soon = int(now_ms()) + 3000
    later = int(now_ms()) + 3_600_000
    scheduler.add(
        NORMAL_STREAM,
        [
            request(NORMAL_STREAM, "a", 5),
            request(NORMAL_STREAM, "b", 6, at=100),
            request(NORMAL_STREAM, "late", 90, at=200, deadline_ms=later),
            request(NORMAL_STREAM, "soon", 90, at=300, deadline_ms=soon),
        ],
    )
    assert [p.ids[0] for p in take(scheduler)] == ["a", "soon"]


async def test_priority_still_comes_first() -> None:
    forward = Shapes(lambda x: x)
    writer = RecordingWriter()
    scheduler = scheduler_for(variable_model(forward, max_batch_size=2), writer)
    scheduler.add(NORMAL_STREAM, [request(NORMAL_STREAM, f"n{i}", 3) for i in range(6)])
    scheduler.add(HIGH_STREAM, [request(HIGH_STREAM, "h-long", 80)])
    await drain(scheduler)
    assert writer.results()[0].id == "h-long"


async def test_grouped_batches_hold_max_batch_bytes() -> None:
    rng = np.random.default_rng(6)
    lengths = [int(n) for n in rng.integers(1, 40, 40)]
    forward = Shapes(lambda x: x * 2)
    writer = RecordingWriter()
    model = variable_model(forward, max_batch_size=8, max_batch_bytes=4 * 60)  # 60 elements
    scheduler = scheduler_for(model, writer)
    scheduler.add(
        NORMAL_STREAM, [request(NORMAL_STREAM, f"r{i}", n) for i, n in enumerate(lengths)]
    )
    await drain(scheduler)
    assert all(4 * rows * length <= 240 for rows, length in forward.shapes), forward.shapes
    assert len(writer.results()) == 40
    assert {r.status for r in writer.results()} == {"ok"}


@pytest.mark.parametrize("on", [True, False])
async def test_light_load_runs_what_is_there_at_once(on: bool) -> None:
    scheduler = scheduler_for(
        variable_model(Shapes(lambda x: x), max_batch_size=8, group_by_length=on),
        RecordingWriter(),
    )
    scheduler.add(
        NORMAL_STREAM, [request(NORMAL_STREAM, f"r{i}", n) for i, n in enumerate([3, 70, 5])]
    )
    assert [p.ids[0] for p in take(scheduler)] == ["r0", "r1", "r2"]


async def test_a_burst_that_arrived_together_is_batched_by_length_passing_nobody_over() -> None:
    """Requests enqueued together (one submit_many) have no order among
    themselves: batches follow length alone and no pass-over is counted, so
    nothing is forced in at the bound; a request that arrives later still
    counts as passing the burst's requests over."""
    scheduler = scheduler_for(
        variable_model(Shapes(lambda x: x), max_batch_size=4, max_passed_over=1),
        RecordingWriter(),
    )
    lengths = [90, 5, 60, 6, 91, 7, 61, 8, 92, 62, 9, 93]
    scheduler.add(
        NORMAL_STREAM, [request(NORMAL_STREAM, f"r{i}", n) for i, n in enumerate(lengths)]
    )
    backlog = scheduler._backlogs[NORMAL_STREAM.queue]
    batches = []
    while backlog.items:
        batches.append(sorted(int(p.inputs["x"].shape[1]) for p in take(scheduler)))
        assert backlog.passed == {}
    assert sorted(batches) == [[5, 6, 7, 8], [9, 60, 61, 62], [90, 91, 92, 93]], batches
    # a later arrival of the oldest one's length: the burst's others are passed over
    burst = [request(NORMAL_STREAM, f"b{i}", n) for i, n in enumerate(lengths)]
    scheduler.add(NORMAL_STREAM, burst)
    scheduler.add(NORMAL_STREAM, [request(NORMAL_STREAM, f"late{k}", 90, at=100) for k in range(3)])
    take(scheduler)
    assert backlog.passed


async def test_pass_over_counts_do_not_outlive_their_requests() -> None:
    scheduler = scheduler_for(
        variable_model(Shapes(lambda x: x), max_batch_size=2), RecordingWriter()
    )
    lengths = [5, 90, 6, 91, 7, 92, 8, 93]
    scheduler.add(
        NORMAL_STREAM, [request(NORMAL_STREAM, f"r{i}", n) for i, n in enumerate(lengths)]
    )
    while scheduler._backlogs[NORMAL_STREAM.queue].items:
        take(scheduler)
    assert scheduler._backlogs[NORMAL_STREAM.queue].passed == {}


@pytest.mark.parametrize(("bound", "on", "batches"), [(8, True, 16), (1, True, 2), (8, False, 2)])
async def test_a_grouping_model_reads_ahead_twice_its_bound(
    bound: int, on: bool, batches: int
) -> None:
    """The reader pauses at 2 x max_passed_over batches (at least the usual 2)
    for a model grouping by length: a request passed over the most times has
    had that many batches of lengths to be matched with."""
    model = variable_model(
        Shapes(lambda x: x), max_batch_size=4, max_passed_over=bound, group_by_length=on
    )
    scheduler = scheduler_for(model, RecordingWriter())
    assert scheduler.room(NORMAL_STREAM) == batches * 4
    scheduler.add(NORMAL_STREAM, [request(NORMAL_STREAM, f"r{i}", 5) for i in range(3)])
    assert scheduler.room(NORMAL_STREAM) == batches * 4 - 3


def _batch_order_by_parcel(candidates: list[Candidate], max_rows: int) -> list[int]:
    """The rule of worker/grouping.py written parcel by parcel, as plainly as
    it reads in its docstring: the columnar version must pick the same."""
    forced = [i for i, c in enumerate(candidates) if c.forced]
    oldest = [i for i, c in enumerate(candidates) if i == 0 or c.tied]
    anchors = [i for i in oldest if candidates[i].joinable and i not in forced]
    anchored = any(i in forced for i in oldest)
    if not anchored and len(anchors) <= 1:  # the oldest arrived alone: it goes in
        forced, anchored = sorted({0, *forced}), True
    room = max_rows - sum(candidates[i].rows for i in forced)
    free = sorted((c.size, i) for i, c in enumerate(candidates) if i not in forced and c.joinable)
    if room <= 0 or not free:
        return forced
    longest = max((candidates[i].size for i in forced), default=0)

    def run_from(start: int) -> list[tuple[int, int]]:
        """Parcels in size order until they hold ``room`` rows (the last may
        hold more: the scheduler splits it)."""
        run, rows = [], 0
        for size, i in free[start:]:
            if rows >= room:
                break
            run.append((size, i))
            rows += candidates[i].rows
        return run

    def waste(run: list[tuple[int, int]]) -> int:
        members = forced + [i for _, i in run]
        pad_to = max(longest, run[-1][0])
        return sum(candidates[i].rows * (pad_to - candidates[i].size) for i in members)

    runs = []
    for start in range(len(free)):
        runs.append(run_from(start))
        if free[start + len(runs[-1]) - 1] == free[-1]:
            break  # later starts only hold fewer rows
    if not anchored:  # one of the oldest arrivals must be in it
        runs = [r for r in runs if any(i in anchors for _, i in r)]
    best = min(runs, key=lambda r: (waste(r), min(i for _, i in r)))
    pivot = candidates[min(forced + [i for _, i in best])].size
    return forced + [i for _, i in sorted(best, key=lambda p: (abs(p[0] - pivot), p[1]))]


def test_the_columnar_choice_is_the_rule_parcel_by_parcel() -> None:
    rng = np.random.default_rng(11)
    for _ in range(3000):
        count = int(rng.integers(1, 40))
        spread = int(rng.choice([3, 50, 300]))
        together = float(rng.choice([0.0, 0.3, 1.0]))  # the share that arrived with the oldest
        candidates = [
            Candidate(
                int(rng.integers(1, spread + 1)), int(rng.choice([1, 1, 2, 5])),
                bool(rng.random() < 0.1), bool(rng.random() < 0.9), bool(rng.random() < together),
            )
            for _ in range(count)
        ]  # fmt: skip
        max_rows = int(rng.choice([1, 4, 8, 32]))
        expected = _batch_order_by_parcel(candidates, max_rows)
        assert batch_order(BacklogColumns.of(candidates), max_rows) == expected, candidates
