"""The worker's parts on their own, each handed the parts it talks to (a
recording writer, a real executor on a plain Python model, fakeredis where
Redis is read): batch formation, priorities, settling, bisecting, and what
the reader makes of every kind of hostile entry. No processes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import fakeredis
import msgpack
import numpy as np
import pytest
import torch

from common.bundle import unpack_results
from common.codec import encode_tensor
from common.envelope import Request, Result, unpack_result
from common.keys import HIGH, NORMAL, Keys
from common.records import DeadLetter
from common.settings import ModelConfig, load_settings
from common.spec import TensorSpec
from worker.control import ControlFeed
from worker.executor import Executor
from worker.reader import StreamReader
from worker.registry import LoadedModel
from worker.scheduler import INLINE_MAX_MS, Scheduler
from worker.served import ServedModels
from worker.stats import Stats
from worker.work import Accepted, Outcome, Stream

KEYS = Keys()
INBOX = KEYS.inbox("test")
HIGH_STREAM = Stream(KEYS.queue("m", HIGH), "m", HIGH)
NORMAL_STREAM = Stream(KEYS.queue("m", NORMAL), "m", NORMAL)


def small_model(
    forward: Callable[[torch.Tensor], torch.Tensor],
    max_batch_size: int = 4,
    shape: tuple[int, ...] = (3,),
    **config: Any,
) -> LoadedModel:
    """Model "m": one float32 input x and one output y, both of ``shape``."""
    model_config = ModelConfig(
        "m", Path("unused.pt"),
        inputs=(TensorSpec("x", "float32", shape),), outputs=(TensorSpec("y", "float32", shape),),
        max_batch_size=max_batch_size, max_delay_ms=0, **config,
    )  # fmt: skip
    return LoadedModel(model_config, model_config.spec("v1"), forward)


class RecordingWriter:
    """Stands in for the writer: keeps what would be written, in order."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.dead: list[DeadLetter] = []
        self.changed = asyncio.Event()
        self.idle: list[bool] = []  # per put of outcomes: written in the caller's task?

    async def put(self, outcomes: Sequence[Outcome], *, idle: bool = False) -> asyncio.Future[None]:
        self.outcomes.extend(outcomes)
        if outcomes:
            self.idle.append(idle)
        self.changed.set()
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        written.set_result(None)
        return written

    async def dead_letter(
        self, stream: Stream, letters: Sequence[DeadLetter], *, ack: bool = True
    ) -> None:
        self.dead.extend(letters)

    async def answered(self, count: int) -> None:
        """Until ``count`` requests have their result."""
        while len(self.results()) < count:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 30)

    def results(self) -> list[Result]:
        """Each answered request's own result, in order (not the ack-only ones)."""
        return [unpack_result(p) for o in self.outcomes if o.singles for p in o.singles()]

    def pushed(self) -> list[Result]:
        """What the inboxes would receive, result bundles split."""
        return [r for o in self.outcomes for _, p in o.pushes for r in unpack_results(p)]


class Calls:
    """A forward that records the rows of each call and doubles its input."""

    def __init__(self, fail_on: float | None = None) -> None:
        self.rows: list[int] = []
        self.fail_on = fail_on

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.rows.append(int(x.shape[0]))
        if self.fail_on is not None and bool((x == self.fail_on).any()):
            raise ValueError("poisoned row")
        return x * 2


def accepted(stream: Stream, request_id: str, value: float = 1.0, **kwargs: Any) -> Accepted:
    deliveries = kwargs.pop("deliveries", 1)
    request = Request(request_id, "m", {"x": np.full((1, 3), value, np.float32)}, **kwargs)
    entry_id = f"{int(time.time() * 1000)}-{abs(hash(request_id)) % 1000}".encode()
    return Accepted.single(stream, entry_id, request, 1, deliveries)


def scheduler_for(
    model: LoadedModel, writer: RecordingWriter, feed: ControlFeed | None = None
) -> Scheduler:
    return Scheduler(
        [HIGH_STREAM, NORMAL_STREAM], served=ServedModels([model]), executor=Executor("cpu"),
        writer=writer, feed=feed or ControlFeed(fakeredis.FakeAsyncRedis(), KEYS, 0.1, print),
        stats=Stats(), worker="w",
    )  # type: ignore[arg-type]  # fmt: skip


async def drain(scheduler: Scheduler) -> None:
    """Everything added is computed, then ``run`` returns."""
    scheduler.close()
    await asyncio.wait_for(scheduler.run(), 30)


async def test_high_priority_goes_first_and_batches_hold_max_rows() -> None:
    calls, writer = Calls(), RecordingWriter()
    scheduler = scheduler_for(small_model(calls), writer)
    scheduler.add(NORMAL_STREAM, [accepted(NORMAL_STREAM, f"n{i}", i) for i in range(6)])
    scheduler.add(HIGH_STREAM, [accepted(HIGH_STREAM, f"h{i}", 10 + i) for i in range(2)])
    await drain(scheduler)
    results = writer.results()
    assert [r.id for r in results][:2] == ["h0", "h1"]
    assert sorted(r.id for r in results[2:]) == [f"n{i}" for i in range(6)]
    assert calls.rows == [2, 4, 2]
    assert all(r.status == "ok" for r in results)
    for r in results:  # each request gets its own rows back
        value = 10 + int(r.id[1:]) if r.id[0] == "h" else int(r.id[1:])
        np.testing.assert_array_equal(r.outputs["y"], np.full((1, 3), 2.0 * value, np.float32))


async def test_cancelled_and_expired_requests_are_answered_without_compute() -> None:
    calls, writer = Calls(), RecordingWriter()
    feed = ControlFeed(fakeredis.FakeAsyncRedis(), KEYS, 0.1, print)
    feed.add_cancelled("gone")
    scheduler = scheduler_for(small_model(calls), writer, feed)
    past = int(time.time() * 1000) - 1000
    scheduler.add(
        NORMAL_STREAM,
        [
            accepted(NORMAL_STREAM, "gone", 1.0),
            accepted(NORMAL_STREAM, "late", 2.0, deadline_ms=past),
            accepted(NORMAL_STREAM, "fine", 3.0),
        ],
    )
    await drain(scheduler)
    status = {r.id: (r.status, r.error_code) for r in writer.results()}
    assert status == {
        "gone": ("cancelled", "cancelled"),
        "late": ("expired", "expired"),
        "fine": ("ok", ""),
    }
    assert calls.rows == [1]  # only "fine" was computed


async def test_a_redelivered_request_runs_alone() -> None:
    calls, writer = Calls(), RecordingWriter()
    scheduler = scheduler_for(small_model(calls), writer)
    scheduler.add(
        NORMAL_STREAM,
        [
            accepted(NORMAL_STREAM, "a", 1.0),
            accepted(NORMAL_STREAM, "again", 2.0, deliveries=2),
            accepted(NORMAL_STREAM, "b", 3.0),
        ],
    )
    await drain(scheduler)
    assert calls.rows == [1, 1, 1]
    assert {r.id: r.batch_size for r in writer.results()} == {"a": 1, "again": 1, "b": 1}


async def test_a_raising_batch_is_bisected_to_the_culprit() -> None:
    calls, writer = Calls(fail_on=13.0), RecordingWriter()
    scheduler = scheduler_for(small_model(calls), writer)
    scheduler.add(NORMAL_STREAM, [accepted(NORMAL_STREAM, f"r{v}", v) for v in (11, 12, 13, 14)])
    await drain(scheduler)
    status = {r.id: (r.status, r.error_code) for r in writer.results()}
    assert status.pop("r13") == ("error", "model_error")
    assert set(status.values()) == {("ok", "")}
    assert len(status) == 3


class Threads:
    """A forward that records the thread of each call, takes at least
    ``ms_per_element`` x its input's elements (the model's own compute
    time, not a wait for anything) and doubles its input."""

    def __init__(self, ms_per_element: float = 0.0) -> None:
        self.threads: list[str] = []
        self.ms_per_element = ms_per_element

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.threads.append(threading.current_thread().name)
        time.sleep(self.ms_per_element * x.numel() / 1000)
        return x * 2


async def run_one_by_one(
    model: LoadedModel, requests: Sequence[Sequence[Accepted]]
) -> RecordingWriter:
    """Each group of requests added once the one before is answered."""
    writer = RecordingWriter()
    scheduler = scheduler_for(model, writer)
    running = asyncio.create_task(scheduler.run())
    for group in requests:
        scheduler.add(NORMAL_STREAM, group)
        await writer.answered(len(writer.results()) + len(group))
    scheduler.close()
    await asyncio.wait_for(running, 30)
    assert {r.status for r in writer.results()} == {"ok"}
    return writer


async def test_a_lone_short_batch_runs_on_the_loop_a_fuller_one_in_the_compute_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("worker.scheduler.INLINE_MAX_MS", 10_000.0)  # whatever this box's load
    threads = Threads()
    groups = [[accepted(NORMAL_STREAM, i)] for i in "ab"]
    groups.append([accepted(NORMAL_STREAM, i) for i in "cde"])
    writer = await run_one_by_one(small_model(threads), groups)
    # the first has no timing to go by; the third batch holds three rows
    assert threads.threads == ["compute_0", threading.current_thread().name, "compute_0"]
    # nothing else waited behind any of them: each answer written by the scheduler itself
    assert writer.idle == [True, True, True]


async def test_an_answer_with_work_behind_it_goes_through_the_writer_queue() -> None:
    writer = RecordingWriter()
    scheduler = scheduler_for(small_model(Calls(), max_batch_size=2), writer)
    scheduler.add(NORMAL_STREAM, [accepted(NORMAL_STREAM, i) for i in "abc"])
    await drain(scheduler)
    # "c" waited while "a" and "b" computed: their answer did not hold it up
    assert writer.idle == [False, True]


async def test_a_lone_batch_of_a_slow_model_stays_in_the_compute_thread() -> None:
    threads = Threads(ms_per_element=INLINE_MAX_MS / 3)  # 3 elements a request
    await run_one_by_one(small_model(threads), [[accepted(NORMAL_STREAM, f"r{i}")] for i in "123"])
    assert threads.threads == ["compute_0"] * 3


async def test_a_long_lone_request_after_short_ones_stays_in_the_compute_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("worker.scheduler.INLINE_MAX_MS", 50.0)
    threads = Threads(ms_per_element=0.01)  # 10 elements: 0.1 ms; 10,000: at least 100 ms
    model = small_model(threads, shape=(-1,))

    def lone(request_id: str, length: int) -> list[Accepted]:
        return [accepted_array(NORMAL_STREAM, request_id, np.ones((1, length), np.float32))]

    await run_one_by_one(model, [lone("a", 10), lone("b", 10), lone("long", 10_000)])
    assert threads.threads == ["compute_0", threading.current_thread().name, "compute_0"]


# -- outputs that break their declared shapes, and max_batch_bytes ------------


def accepted_array(stream: Stream, request_id: str, x: np.ndarray[Any, Any]) -> Accepted:
    entry_id = f"{int(time.time() * 1000)}-{abs(hash(request_id)) % 1000}".encode()
    return Accepted.single(stream, entry_id, Request(request_id, "m", {"x": x}), x.shape[0])


class Shapes:
    """A forward that records the shape of each call's input, then applies ``f``."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.f = f

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return self.f(x)


async def run_requests(
    model: LoadedModel, requests: dict[str, np.ndarray[Any, Any]]
) -> dict[str, Result]:
    writer = RecordingWriter()
    scheduler = scheduler_for(model, writer)
    scheduler.add(NORMAL_STREAM, [accepted_array(NORMAL_STREAM, k, x) for k, x in requests.items()])
    await drain(scheduler)
    results = {r.id: r for r in writer.results()}
    assert sorted(results) == sorted(requests)  # exactly one result each
    return results


async def test_a_batch_whose_outputs_have_the_wrong_rows_is_bisected() -> None:
    """forward returns x[:1]: wrong for every batch of more than one row. Each
    one-row request alone is right and gets its own row back; the two-row
    request is wrong alone and gets model_error naming the output and shapes."""
    forward = Shapes(lambda x: x[:1] * 2)
    requests = {
        "a": np.full((1, 3), 1.0, np.float32),
        "b": np.full((1, 3), 2.0, np.float32),
        "two": np.full((2, 3), 3.0, np.float32),
        "d": np.full((1, 3), 4.0, np.float32),
    }
    results = await run_requests(small_model(forward, max_batch_size=8), requests)
    bad = results.pop("two")
    assert (bad.status, bad.error_code) == ("error", "model_error")
    assert bad.error_message == (
        "OutputMismatch: model 'm' output 'y': got shape [1, 3], "
        "declared [n, 3] with n = 2 (the batch's rows)"
    )
    assert not bad.outputs
    for request_id, result in results.items():
        assert result.status == "ok", result.error_message
        np.testing.assert_array_equal(result.outputs["y"], requests[request_id] * 2)
    assert forward.shapes[0] == (5, 3)  # the whole batch ran first, and was refused


async def test_an_output_with_undeclared_columns_is_a_model_error() -> None:
    results = await run_requests(
        small_model(lambda x: torch.cat([x, x], dim=1)),
        {"a": np.ones((1, 3), np.float32), "b": np.ones((2, 3), np.float32)},
    )
    assert {k: (r.status, r.error_code) for k, r in results.items()} == {
        "a": ("error", "model_error"),
        "b": ("error", "model_error"),
    }
    assert "output 'y': got shape [2, 6], declared [n, 3] with n = 2" in results["b"].error_message


async def test_a_variable_output_axis_shorter_than_a_request_is_a_model_error() -> None:
    """forward keeps at most 4 positions: fine for requests up to length 4
    (cut back to their own length), a model error for the longer one."""
    forward = Shapes(lambda x: x[:, :4] * 2)
    requests = {
        "three": np.arange(3, dtype=np.float32)[None],
        "six": np.arange(6, dtype=np.float32)[None],
        "two": np.arange(2, dtype=np.float32)[None],
    }
    results = await run_requests(small_model(forward, shape=(-1,)), requests)
    bad = results.pop("six")
    assert (bad.status, bad.error_code) == ("error", "model_error")
    assert bad.error_message == (
        "OutputMismatch: model 'm' output 'y': got shape [1, 4], declared [n, -1] "
        "with n = 1 (the batch's rows), each -1 at least 6 (the longest request)"
    )
    for request_id, result in results.items():
        assert result.status == "ok", result.error_message
        np.testing.assert_array_equal(result.outputs["y"], requests[request_id] * 2)


async def test_batches_stop_before_passing_max_batch_bytes() -> None:
    """64 bytes = 16 float32 of padded input per forward: the long request
    is not batched with the short ones before it, nor with those after it."""
    forward = Shapes(lambda x: x * 2)
    lengths = {"r0": 2, "r1": 2, "r2": 2, "long": 10, "r4": 2, "r5": 2}
    requests = {k: np.full((1, n), i + 1, np.float32) for i, (k, n) in enumerate(lengths.items())}
    model = small_model(forward, max_batch_size=8, shape=(-1,), max_batch_bytes=64)
    results = await run_requests(model, requests)
    assert forward.shapes == [(3, 2), (1, 10), (2, 2)]
    assert all(4 * rows * length <= 64 for rows, length in forward.shapes)
    for request_id, result in results.items():
        assert result.status == "ok", result.error_message
        np.testing.assert_array_equal(result.outputs["y"], requests[request_id] * 2)


async def test_max_batch_bytes_bounds_fixed_shape_batches_too() -> None:
    forward = Shapes(lambda x: x * 2)
    requests = {f"r{i}": np.full((1, 3), i, np.float32) for i in range(5)}
    results = await run_requests(small_model(forward, max_batch_bytes=24), requests)
    assert [rows for rows, _ in forward.shapes] == [2, 2, 1]  # 2 rows x 3 x 4 bytes = 24
    assert {r.status for r in results.values()} == {"ok"}


# -- the reader: every kind of hostile entry, one at a time ------------------

X = encode_tensor(np.ones((1, 3), np.float32))


def body(**fields: Any) -> dict[bytes, bytes]:
    request = {"id": "bad", "model": "m", "reply_to": INBOX, "inputs": {"x": X}, **fields}
    return {b"req": msgpack.packb(request, use_bin_type=True)}


HOSTILE = [
    pytest.param({b"req": b"\xc1\x00garbage"}, "dead", id="not-msgpack"),
    pytest.param({b"other": b"field"}, "dead", id="no-req-field"),
    pytest.param({b"req": msgpack.packb([1, 2, 3])}, "dead", id="not-a-map"),
    pytest.param(
        {b"req": msgpack.packb({"model": "m", "inputs": {"x": X}})}, "dead", id="missing-id"
    ),
    pytest.param(
        body(inputs={"x": {"dtype": "complex128", "shape": [1, 3], "data": b""}}),
        "protocol_error",
        id="unknown-dtype",
    ),
    pytest.param(
        body(inputs={"x": {"dtype": "float32", "shape": [2**40, 2**40], "data": b""}}),
        "protocol_error",
        id="huge-shape",
    ),
    pytest.param(
        body(inputs={"x": {"dtype": "float32", "shape": [1, 2], "data": b"\0" * 8}}),
        "invalid_input",
        id="wrong-shape-for-model",
    ),
    pytest.param(body(inputs="not a map"), "protocol_error", id="inputs-not-a-map"),
    pytest.param(body(model="other"), "invalid_input", id="other-model's-queue"),
    pytest.param(body(deadline="soon"), "protocol_error", id="deadline-not-a-number"),
    pytest.param(body(reply_to="tq:q:m"), "invalid_input", id="reply-to-not-an-inbox"),
    pytest.param(body(), "accepted", id="well-formed"),
]


class RecordingScheduler:
    def __init__(self) -> None:
        self.added: list[Accepted] = []

    def add(self, stream: Stream, items: Sequence[Accepted]) -> None:
        self.added.extend(items)


@pytest.mark.parametrize(("fields", "expected"), HOSTILE)
async def test_the_reader_answers_or_buries_each_hostile_entry(
    fields: dict[bytes, bytes], expected: str, tmp_path: Path
) -> None:
    from worker.leases import Leases

    settings = load_settings(env={}, overrides={"redis.url": "redis://unused"})
    model = small_model(Calls())
    writer, scheduler = RecordingWriter(), RecordingScheduler()
    leases = Leases()
    redis = fakeredis.FakeAsyncRedis()
    reader = StreamReader(
        NORMAL_STREAM, settings=settings, redis=redis, consumer="w",
        served=ServedModels([model]), scheduler=scheduler, writer=writer,  # type: ignore[arg-type]
        leases=leases, feed=ControlFeed(redis, KEYS, 0.1, print), stats=Stats(),
    )  # fmt: skip
    entry_id = b"1700000000000-0"
    await reader.accept([(entry_id, fields)], 1)
    if expected == "dead":
        assert [d.entry_id for d in writer.dead] == [entry_id]
        assert writer.dead[0].reason
        assert not writer.outcomes and not scheduler.added
    elif expected == "accepted":
        assert [a.ids for a in scheduler.added] == [("bad",)]
        assert not writer.outcomes and not writer.dead
        assert leases.holds(NORMAL_STREAM.queue, entry_id)
    else:
        [result] = writer.results()
        assert (result.id, result.status, result.error_code) == ("bad", "error", expected)
        assert result.error_message
        if "reply_to" not in result.error_message:
            assert [i for i, _ in writer.outcomes[0].pushes] == [INBOX]  # the producer is told
        assert not scheduler.added and not writer.dead
        assert leases.holds(NORMAL_STREAM.queue, entry_id)  # until the writer releases it


async def test_the_reader_refuses_a_request_over_max_batch_bytes() -> None:
    from worker.leases import Leases

    settings = load_settings(env={}, overrides={"redis.url": "redis://unused"})
    model = small_model(Calls(), max_batch_bytes=8)  # one row of x is 12 bytes
    writer, scheduler = RecordingWriter(), RecordingScheduler()
    redis = fakeredis.FakeAsyncRedis()
    reader = StreamReader(
        NORMAL_STREAM, settings=settings, redis=redis, consumer="w",
        served=ServedModels([model]), scheduler=scheduler, writer=writer,  # type: ignore[arg-type]
        leases=Leases(), feed=ControlFeed(redis, KEYS, 0.1, print), stats=Stats(),
    )  # fmt: skip
    await reader.accept([(b"1700000000000-0", body())], 1)
    [result] = writer.results()
    assert (result.id, result.status, result.error_code) == ("bad", "error", "invalid_input")
    assert result.error_message == (
        "inputs take 12 bytes, over model 'm' max_batch_bytes 8 (the most one forward's "
        "inputs may take): send fewer rows or shorter inputs"
    )
    assert [i for i, _ in writer.outcomes[0].pushes] == [INBOX] and not scheduler.added
