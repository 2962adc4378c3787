"""Bundles: many requests in one stream entry and many results in one inbox
element (common/bundle.py), and what the worker's parts make of them: one
parcel per stacked bundle, per-member answers for malformed members,
redelivered bundles member by member, parcels split between batches, and an
entry acked only with the answer to its last request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fakeredis
import msgpack
import numpy as np
import pytest
import torch
from redis.exceptions import ConnectionError as RedisConnectionError

from common.bundle import (
    pack_bundle,
    pack_result_bundle,
    unpack_bundle,
    unpack_entry,
    unpack_results,
)
from common.codec import encode_tensor
from common.envelope import Request, Result, Timings, pack_result, unpack_result
from common.errors import ProtocolError
from common.keys import Keys
from common.settings import load_settings
from tests.unit.test_worker_parts import (
    INBOX,
    KEYS,
    NORMAL_STREAM,
    Calls,
    RecordingScheduler,
    RecordingWriter,
    accepted,
    drain,
    scheduler_for,
    small_model,
)
from worker.commit import CommitPlan, Committer
from worker.control import ControlFeed
from worker.leases import Leases
from worker.reader import StreamReader
from worker.served import ServedModels
from worker.stats import Stats
from worker.work import Accepted, Outcome, fixed
from worker.writer import Writer

OTHER_INBOX = KEYS.inbox("other")


def requests(n: int, *, rows: int = 1, **fields: Any) -> list[Request]:
    return [
        Request(f"r{i}", "m", {"x": np.full((rows, 3), i, np.float32)}, reply_to=INBOX, **fields)
        for i in range(n)
    ]


# -- the wire format ------------------------------------------------------------


def test_a_bundle_stacks_equal_shapes_and_keeps_shared_fields_once() -> None:
    sent = requests(4, deadline_ms=123)
    body = msgpack.unpackb(pack_bundle(sent), raw=False)
    assert body["ids"] == ["r0", "r1", "r2", "r3"] and body["rows"] == [1, 1, 1, 1]
    assert body["inputs"]["x"]["shape"] == [4, 3]  # stacked: one tensor
    assert body["deadline"] == 123 and body["reply_to"] == INBOX  # one value for all
    assert "store" not in body and "priority" not in body  # the defaults
    bundle = unpack_entry(pack_bundle(sent))
    assert not isinstance(bundle, Request) and not bundle.errors
    assert bundle.inputs is not None and bundle.offsets == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(bundle.inputs["x"][2:3], sent[2].inputs["x"])


def test_differing_shapes_are_listed_and_fields_per_member() -> None:
    sent = [
        Request("a", "m", {"x": np.ones((1, 2), np.float32)}, 5, INBOX, store=False),
        Request("b", "m", {"x": np.ones((2, 4), np.float32)}, None, OTHER_INBOX),
    ]
    body = msgpack.unpackb(pack_bundle(sent), raw=False)
    assert isinstance(body["inputs"]["x"], list) and body["deadline"] == [5, None]
    assert body["store"] == [False, True] and body["rows"] == [1, 2]
    bundle = unpack_entry(pack_bundle(sent))
    assert not isinstance(bundle, Request) and bundle.inputs is None
    assert [m["x"].shape for m in bundle.member_inputs or [] if m] == [(1, 2), (2, 4)]
    assert bundle.reply_to == [INBOX, OTHER_INBOX] and bundle.store == [False, True]


def bundle_body(**fields: Any) -> dict[str, Any]:
    body = {"ids": ["a", "b", "c"], "model": "m", "rows": [1, 1, 1], "reply_to": INBOX,
            "inputs": {"x": encode_tensor(np.ones((3, 3), np.float32))}}  # fmt: skip
    return {**body, **fields}


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        pytest.param({"ids": ["a", 7, "c"]}, {1: None}, id="unreadable-id"),
        pytest.param({"deadline": [1, "soon", 3]}, {1: "b"}, id="one-bad-deadline"),
        pytest.param({"store": [True, True, "yes"]}, {2: "c"}, id="one-bad-store"),
        pytest.param({"rows": [1, 1]}, {0: "a", 1: "b", 2: "c"}, id="rows-of-two"),
        pytest.param({"rows": [1, 1, 2]}, {0: "a", 1: "b", 2: "c"}, id="rows-do-not-add-up"),
        pytest.param({"deadline": "soon"}, {0: "a", 1: "b", 2: "c"}, id="bad-shared-value"),
        pytest.param({"v": 2}, {0: "a", 1: "b", 2: "c"}, id="unknown-version"),
    ],
)
def test_a_malformed_member_is_its_own_error(fields: dict[str, Any], bad: dict[int, Any]) -> None:
    bundle = unpack_bundle(bundle_body(**fields))
    assert {i: e.request_id for i, e in bundle.errors.items()} == bad
    assert all(e.message for e in bundle.errors.values())


def test_a_bundle_without_ids_cannot_be_answered() -> None:
    with pytest.raises(ProtocolError) as info:
        unpack_bundle({"ids": [], "model": "m"})
    assert info.value.request_id is None


def test_a_result_bundle_splits_into_each_members_result() -> None:
    outputs = {"y": np.arange(12, dtype=np.float32).reshape(4, 3)}
    element = pack_result_bundle(["a", "b", "c"], [1, 2, 1], outputs, {},
                                 Timings(1.5, 2.0, 9, "w"))  # fmt: skip
    results = unpack_results(element)
    assert [r.id for r in results] == ["a", "b", "c"]
    np.testing.assert_array_equal(results[1].outputs["y"], outputs["y"][1:3])
    assert {(r.status, r.queued_ms, r.batch_size, r.worker) for r in results} == {
        ("ok", 1.5, 9, "w")
    }
    single = pack_result(Result("z", "error", error_code="model_error", error_message="boom"))
    assert [r.id for r in unpack_results(single)] == ["z"]
    with pytest.raises(ProtocolError):
        unpack_results(msgpack.packb({"ids": ["a"], "rows": [3], "status": "ok",
                                      "outputs": {"y": encode_tensor(outputs["y"])}}))  # fmt: skip


# -- the reader -----------------------------------------------------------------


def reader_for(writer: RecordingWriter, scheduler: RecordingScheduler, leases: Leases,
               **config: Any) -> StreamReader:  # fmt: skip
    settings = load_settings(env={}, overrides={"redis.url": "redis://unused"})
    redis = fakeredis.FakeAsyncRedis()
    return StreamReader(
        NORMAL_STREAM, settings=settings, redis=redis, consumer="w",
        served=ServedModels([small_model(Calls(), **config)]), scheduler=scheduler,  # type: ignore[arg-type]
        writer=writer, leases=leases, feed=ControlFeed(redis, KEYS, 0.1, print),  # type: ignore[arg-type]
        stats=Stats(),
    )  # fmt: skip


def entry_id_now() -> bytes:
    return f"{int(time.time() * 1000) + 60_000}-0".encode()  # after the feed started


async def test_a_stacked_bundle_is_one_parcel() -> None:
    writer, scheduler, leases = RecordingWriter(), RecordingScheduler(), Leases()
    reader = reader_for(writer, scheduler, leases)
    entry_id = entry_id_now()
    await reader.accept([(entry_id, {b"req": pack_bundle(requests(4))})], 1)
    [parcel] = scheduler.added
    assert parcel.ids == ("r0", "r1", "r2", "r3") and parcel.rows == 4
    assert not writer.outcomes and not writer.dead
    assert leases.answer(NORMAL_STREAM.queue, entry_id, 3) is None  # 4 requests held
    assert leases.answer(NORMAL_STREAM.queue, entry_id, 1) == 4


async def test_bad_members_are_answered_alone_and_the_rest_go_on() -> None:
    writer, scheduler, leases = RecordingWriter(), RecordingScheduler(), Leases()
    reader = reader_for(writer, scheduler, leases)
    x = encode_tensor(np.ones((4, 3), np.float32))
    inboxes = [INBOX, INBOX, "tq:q:m", INBOX]
    raw = msgpack.packb(
        bundle_body(ids=["a", 7, "c", "d"], rows=[1, 1, 1, 1], reply_to=inboxes, inputs={"x": x})
    )
    await reader.accept([(entry_id_now(), {b"req": raw})], 1)
    [parcel] = scheduler.added
    assert parcel.ids == ("a", "d")
    [result] = writer.results()
    assert (result.id, result.error_code) == ("c", "invalid_input")
    assert "is not an inbox key" in result.error_message
    assert [d.reason for d in writer.dead] == ["bundle member 1: 'id' must be a non-empty string"]
    assert writer.dead[0].raw == raw  # the whole bundle, for the operator
    assert sum(o.answered for o in writer.outcomes) == 2  # c, and the unreadable one


async def test_a_bundle_for_a_wrong_shape_is_invalid_for_every_member() -> None:
    writer, scheduler, leases = RecordingWriter(), RecordingScheduler(), Leases()
    reader = reader_for(writer, scheduler, leases)
    wrong = [Request(f"w{i}", "m", {"x": np.ones((1, 5), np.float32)}, reply_to=INBOX)
             for i in range(3)]  # fmt: skip
    await reader.accept([(entry_id_now(), {b"req": pack_bundle(wrong)})], 1)
    assert not scheduler.added
    assert {(r.id, r.error_code) for r in writer.results()} == {
        ("w0", "invalid_input"),
        ("w1", "invalid_input"),
        ("w2", "invalid_input"),
    }


async def test_a_redelivered_bundle_comes_member_by_member() -> None:
    writer, scheduler, leases = RecordingWriter(), RecordingScheduler(), Leases()
    reader = reader_for(writer, scheduler, leases)
    await reader.accept([(b"1700000000000-0", {b"req": pack_bundle(requests(3))})], 2)
    assert [p.ids for p in scheduler.added] == [("r0",), ("r1",), ("r2",)]
    assert all(p.redelivered for p in scheduler.added)


async def test_members_answered_before_a_redelivery_are_only_counted() -> None:
    writer, scheduler, leases = RecordingWriter(), RecordingScheduler(), Leases()
    reader = reader_for(writer, scheduler, leases)
    redis: Any = reader._redis
    await redis.set(KEYS.result("r1"), b"answered")
    await reader.accept([(b"1700000000000-0", {b"req": pack_bundle(requests(3))})], 2)
    assert [p.ids for p in scheduler.added] == [("r0",), ("r2",)]
    [ack] = writer.outcomes
    assert ack.ids == ("r1",) and ack.singles is None and not ack.pushes


async def test_past_max_deliveries_the_first_unanswered_member_is_buried() -> None:
    writer, scheduler, leases = RecordingWriter(), RecordingScheduler(), Leases()
    reader = reader_for(writer, scheduler, leases)
    redis: Any = reader._redis
    await redis.set(KEYS.result("r0"), b"answered")
    entry = (b"1700000000000-0", {b"req": pack_bundle(requests(4))})
    await reader.accept([entry], 4, bury_first=True)
    assert [p.ids for p in scheduler.added] == [("r2",), ("r3",)]
    [letter] = writer.dead
    alone = unpack_entry(letter.raw)  # the culprit alone, as a single request
    assert isinstance(alone, Request) and (alone.id, alone.reply_to) == ("r1", INBOX)
    np.testing.assert_array_equal(alone.inputs["x"], np.full((1, 3), 1, np.float32))
    assert "'r1'" in letter.reason and "delivered 3 times" in letter.reason
    poison = [r for r in writer.results() if r.id == "r1"]
    assert [(r.status, r.error_code) for r in poison] == [("error", "poison")]


# -- the scheduler and executor -------------------------------------------------


def parcel(ids: list[str], *, rows: int = 1, store: bool = False, inbox: str = INBOX,
           deadlines: list[int | None] | None = None) -> Accepted:  # fmt: skip
    n = len(ids)
    x = np.arange(n * rows * 3, dtype=np.float32).reshape(n * rows, 3)
    return Accepted(NORMAL_STREAM, entry_id_now(), tuple(ids),
                    tuple(range(0, n * rows + 1, rows)), {"x": x},
                    tuple(deadlines or [None] * n), (inbox,) * n, (store,) * n)  # fmt: skip


async def test_a_bundle_is_split_between_batches_and_each_gets_its_rows() -> None:
    calls, writer = Calls(), RecordingWriter()
    scheduler = scheduler_for(small_model(calls, max_batch_size=4), writer)
    whole = parcel([f"b{i}" for i in range(6)])
    scheduler.add(NORMAL_STREAM, [whole])
    await drain(scheduler)
    assert calls.rows == [4, 2]
    pushed = {r.id: r for r in writer.pushed()}
    assert sorted(pushed) == sorted(whole.ids)
    for i, request_id in enumerate(whole.ids):
        np.testing.assert_array_equal(
            pushed[request_id].outputs["y"], whole.inputs["x"][i : i + 1] * 2
        )
    assert [len(o.pushes) for o in writer.outcomes] == [1, 1]  # one result bundle per parcel


async def test_expired_and_cancelled_members_leave_their_bundle_mates_computed() -> None:
    calls, writer = Calls(), RecordingWriter()
    feed = ControlFeed(fakeredis.FakeAsyncRedis(), KEYS, 0.1, print)
    feed.add_cancelled("c2")
    scheduler = scheduler_for(small_model(calls, max_batch_size=8), writer, feed)
    past = int(time.time() * 1000) - 1000
    scheduler.add(
        NORMAL_STREAM, [parcel(["c0", "c1", "c2", "c3"], deadlines=[None, past, None, None])]
    )
    await drain(scheduler)
    assert calls.rows == [2]
    status = {r.id: r.status for r in writer.results()}
    assert status == {"c1": "expired", "c2": "cancelled", "c0": "ok", "c3": "ok"}


async def test_a_failing_bundle_is_bisected_to_its_member() -> None:
    calls, writer = Calls(fail_on=7.0), RecordingWriter()  # x of member 2 holds 6, 7, 8
    scheduler = scheduler_for(small_model(calls, max_batch_size=8), writer)
    scheduler.add(NORMAL_STREAM, [parcel([f"p{i}" for i in range(4)])])
    await drain(scheduler)
    status = {r.id: (r.status, r.error_code) for r in writer.results()}
    assert status.pop("p2") == ("error", "model_error")
    assert set(status.values()) == {("ok", "")}


# -- the writer's plan ----------------------------------------------------------


def writer_with(leases: Leases) -> Writer:
    return Writer(fakeredis.FakeAsyncRedis(), KEYS, None, leases)  # type: ignore[arg-type]


def ok_outcome(entry_id: bytes, ids: list[str], store: list[bool]) -> Outcome:
    payloads = [pack_result(Result(i, "ok")) for i in ids]
    return Outcome(NORMAL_STREAM.queue, entry_id, tuple(ids), tuple(store),
                   ((INBOX, payloads[0]),), fixed(payloads))  # fmt: skip


def test_an_entry_is_acked_with_its_last_answer_and_partial_answers_are_kept() -> None:
    leases = Leases()
    leases.hold(NORMAL_STREAM.queue, b"1-0", 3)
    writer = writer_with(leases)
    first = writer.plan([ok_outcome(b"1-0", ["a", "b"], [False, False])])
    assert not first.acks  # one request still unanswered
    assert [i for i, _ in first.stored] == ["a", "b"]  # kept, for a redelivery to find
    last = writer.plan([ok_outcome(b"1-0", ["c"], [False])])
    assert last.acks == {NORMAL_STREAM.queue: (3, [b"1-0"])}
    assert not last.stored  # complete: only what asked to be kept is


def test_a_complete_entry_keeps_only_the_results_that_asked() -> None:
    leases = Leases()
    leases.hold(NORMAL_STREAM.queue, b"2-0", 2)
    plan: CommitPlan = writer_with(leases).plan([ok_outcome(b"2-0", ["a", "b"], [True, False])])
    assert [i for i, _ in plan.stored] == ["a"]
    assert plan.pushes == {INBOX: [pack_result(Result("a", "ok"))]}
    assert [unpack_result(p).id for p in plan.pushes[INBOX]] == ["a"]


def test_pushes_go_only_to_inbox_keys(tmp_path: Path) -> None:
    leases = Leases()
    out = Outcome(NORMAL_STREAM.queue, b"3-0", ("a",), (True,), (("tq:q:m", b"x"),), fixed([b"x"]))
    plan = writer_with(leases).plan([out])
    assert not plan.pushes and plan.acks == {NORMAL_STREAM.queue: (1, [b"3-0"])}


class SlowWriter(RecordingWriter):
    """A writer whose commits take a while: each put's future is done later."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[asyncio.Future[None]] = []

    async def put(self, outcomes: Sequence[Outcome], *, idle: bool = False) -> asyncio.Future[None]:
        self.outcomes.extend(outcomes)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not outcomes:  # as the writer: nothing to write is written
            future.set_result(None)
            return future
        loop.call_later(0.05, future.set_result, None)
        self.written.append(future)
        return future


async def test_a_redelivered_request_starts_only_once_the_answer_before_it_is_written() -> None:
    """Redelivered requests run one by one so that, if one kills the worker,
    those before it count as answered: their answers must be written before
    it starts (else a redelivery buries an innocent one)."""
    writer = SlowWriter()
    before: list[bool] = []  # at each forward: were all earlier answers written?

    def forward(x: torch.Tensor) -> torch.Tensor:
        before.append(all(f.done() for f in writer.written))
        return x * 2

    scheduler = scheduler_for(small_model(forward), writer)
    scheduler.add(NORMAL_STREAM, [accepted(NORMAL_STREAM, f"again-{i}", i, deliveries=2)
                                  for i in range(3)])  # fmt: skip
    await drain(scheduler)
    assert before == [True, True, True]
    assert [r.id for r in writer.results()] == ["again-0", "again-1", "again-2"]


class GatedCommitter:
    """Records each commit's acked entries; a commit waits for ``gate`` while it is set up."""

    def __init__(self) -> None:
        self.acked: list[list[bytes]] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def commit(self, plan: CommitPlan) -> int:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        self.acked.append([i for _, ids in plan.acks.values() for i in ids])
        return 0


async def test_an_idle_answer_is_written_before_put_returns_and_commits_keep_their_order() -> None:
    leases = Leases()
    for entry in (b"1-0", b"2-0", b"3-0"):
        leases.hold(NORMAL_STREAM.queue, entry)
    committer = GatedCommitter()
    writer = Writer(fakeredis.FakeAsyncRedis(), KEYS, committer, leases)  # type: ignore[arg-type]
    running = asyncio.create_task(writer.run())
    # nothing queued or being written: written in the caller's task
    done = await writer.put([ok_outcome(b"1-0", ["a"], [False])], idle=True)
    assert done.done() and committer.acked == [[b"1-0"]]
    assert not leases.holds(NORMAL_STREAM.queue, b"1-0")
    # while the writer task is mid-commit, an idle put queues behind it
    committer.gate = asyncio.Event()
    committer.entered.clear()
    first = await writer.put([ok_outcome(b"2-0", ["b"], [False])])
    await committer.entered.wait()
    second = await writer.put([ok_outcome(b"3-0", ["c"], [False])], idle=True)
    assert not second.done()
    committer.gate.set()
    await asyncio.wait_for(asyncio.gather(first, second), 30)
    assert committer.acked == [[b"1-0"], [b"2-0"], [b"3-0"]]
    await writer.close()
    await asyncio.wait_for(running, 30)


class LostRedisCommitter:
    """Every commit fails as if Redis were away."""

    def __init__(self) -> None:
        self.attempts = 0
        self.failed = asyncio.Event()

    async def commit(self, plan: CommitPlan) -> int:
        self.attempts += 1
        self.failed.set()
        raise RedisConnectionError("Redis is away")


async def test_an_idle_answer_stuck_on_a_lost_redis_gives_up_once_the_worker_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("worker.writer.GIVE_UP_WHEN_STOPPING", 1)
    leases = Leases()
    leases.hold(NORMAL_STREAM.queue, b"1-0")
    committer = LostRedisCommitter()
    writer = Writer(fakeredis.FakeAsyncRedis(), KEYS, committer, leases)  # type: ignore[arg-type]
    putting = asyncio.create_task(writer.put([ok_outcome(b"1-0", ["a"], [False])], idle=True))
    await asyncio.wait_for(committer.failed.wait(), 30)
    assert not putting.done()  # retrying while the worker serves on
    writer.stop_soon()
    done = await asyncio.wait_for(putting, 30)
    assert done.done() and committer.attempts >= 2


class RecordingPipelines:
    """Stands in for a cluster client: the commands of each pipeline executed, in order."""

    def __init__(self) -> None:
        self.executed: list[list[str]] = []

    def pipeline(self, transaction: bool = False) -> RecordingPipeline:
        return RecordingPipeline(self.executed)


class RecordingPipeline:
    def __init__(self, executed: list[list[str]]) -> None:
        self._executed = executed
        self._commands: list[str] = []

    async def __aenter__(self) -> RecordingPipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __getattr__(self, command: str) -> Any:
        return lambda *args, **kwargs: self._commands.append(command)

    async def execute(self, raise_on_error: bool = True) -> list[int]:
        self._executed.append(self._commands)
        return [0] * len(self._commands)


async def test_on_a_cluster_results_are_kept_before_any_inbox_hears_of_them() -> None:
    redis = RecordingPipelines()
    plan = CommitPlan(stored=[("a", b"r")], pushes={INBOX: [b"r"]})
    plan.ack(NORMAL_STREAM.queue, b"1-0", 1)
    committer = Committer(redis, Keys(cluster=True), 60)  # type: ignore[arg-type]
    assert await committer.commit(plan) == 0
    assert redis.executed == [["set"], ["lpush", "expire"], ["xack", "xdel", "decrby"]]
