"""Nothing lost: real kills, hostile entries, poison requests, deadlines,
cancellation and backpressure, against a real redis-server and real worker
processes. Every request ends in exactly one terminal result or stays queued."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import redis
import torch

from common.bundle import pack_bundle, unpack_results
from common.codec import encode_tensor
from common.envelope import Request, pack_request, unpack_result
from common.errors import QueueFull, RequestTimeout
from common.keys import CONSUMER_GROUP, Keys
from common.spec import ModelSpec, TensorSpec
from producer import AsyncClient, Submission
from tests.conftest import PoolHandle, wait_until, write_config

KEYS = Keys()
INBOX = "tq:inbox:test"


def raw_request(request_id: str, *, deadline_ms: int | None = None, rows: int = 1) -> bytes:
    x = np.full((rows, 256), 0.5, np.float32)
    return pack_request(Request(request_id, "mlp", {"x": x}, deadline_ms, INBOX))


def pop_results(client: redis.Redis, timeout: float = 5) -> list[Any]:
    """Everything pushed to the test inbox (blocking briefly for the first)."""
    reply: Any = client.blmpop(timeout, 1, INBOX, direction="RIGHT", count=1000)
    return [r for blob in reply[1] for r in unpack_results(blob)] if reply else []


@pytest.fixture
def config(tmp_path: Path, models_dir: Path) -> Path:
    return write_config(tmp_path / "tensorq.toml", models_dir)


@pytest.mark.parametrize("bundle", [1, 50], ids=["single-requests", "bundles-of-50"])
def test_chaos_sigkill_loses_nothing(
    config: Path,
    redis_url: str,
    sync_redis: redis.Redis,
    start_pool: Callable[..., PoolHandle],
    bundle: int,
) -> None:
    """Workers SIGKILLed again and again under load: every request answered
    exactly once. As single-request entries, and as bundles of 50 requests
    per entry that are not kept by id (only their inbox push answers them: a
    bundle answered twice after a kill would show here)."""
    # max_deliveries is raised so that an innocent request held by a worker
    # killed three times in a row is not taken for a poison one.
    pool = start_pool(config, redis_url, env={"TQ_WORKER_MAX_DELIVERIES": "20"})
    total = 10_000
    ids = [f"chaos-{i}" for i in range(total)]
    submitted = 0
    seen: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    answers: dict[str, list[str]] = {}  # id -> who answered, for the failure message
    killed: set[int] = set()
    next_kill = 300
    deadline = time.monotonic() + 240
    while len(seen) < total and time.monotonic() < deadline:
        # keep about a thousand in flight, so the run spans many kills
        if submitted < total and submitted - len(seen) < 1000:
            pipe = sync_redis.pipeline(transaction=False)
            for first in range(submitted, submitted + 500, bundle):
                pipe.xadd(KEYS.queue("mlp"), {"req": chaos_entry(ids[first : first + bundle])})
            pipe.execute()
            submitted += 500
        for result in pop_results(sync_redis, 1):
            seen[result.id] += 1
            statuses[result.status] += 1
            answers.setdefault(result.id, []).append(
                f"{result.worker} batch={result.batch_size} queued={result.queued_ms:.0f}ms"
            )
        if len(seen) >= next_kill:
            victims = [
                int(w["pid"])
                for w in pool.live_workers()
                if int(w["pid"]) not in killed  # type: ignore[call-overload]
            ]
            if victims:
                victim = random.choice(victims)
                os.kill(victim, signal.SIGKILL)
                killed.add(victim)
                next_kill += 300
    print(f"chaos: {len(seen)} ids answered, {len(killed)} workers killed, statuses {statuses}")
    assert set(seen) == set(ids)  # every request answered ...
    twice = {i: answers[i] for i, n in seen.items() if n > 1}
    assert not twice, f"answered more than once: {twice}"  # ... exactly once
    assert statuses == {"ok": total}
    assert len(killed) >= 10
    assert pool.process.poll() is None  # the pool itself survived
    assert sync_redis.xlen(KEYS.queue("mlp")) == 0


def chaos_entry(ids: list[str]) -> bytes:
    """One request, or a bundle of several not kept by id."""
    if len(ids) == 1:
        return raw_request(ids[0])
    x = np.full((1, 256), 0.5, np.float32)
    return pack_bundle([Request(i, "mlp", {"x": x}, None, INBOX, store=False) for i in ids])


def collect(
    sync_redis: redis.Redis,
    answers: Counter[str],
    statuses: Counter[str],
    *,
    until: int,
    timeout: float,
) -> None:
    """Pop results into ``answers`` (per id) and ``statuses`` until ``until`` ids are answered."""
    deadline = time.monotonic() + timeout
    while len(answers) < until:
        assert time.monotonic() < deadline, f"{len(answers)} of {until} answered: {statuses}"
        for result in pop_results(sync_redis, 1):
            answers[result.id] += 1
            statuses[result.status] += 1


def test_entries_of_a_vanished_consumer_are_reclaimed(
    config: Path, redis_url: str, sync_redis: redis.Redis, start_pool: Callable[..., PoolHandle]
) -> None:
    """A consumer read 50 requests and vanished (no worker of its pool will
    ever re-read them): a live worker takes them over after claim_idle_ms and
    answers each once; one deleted while pending goes to the dead letters."""
    queue = KEYS.queue("mlp")
    sync_redis.xgroup_create(queue, CONSUMER_GROUP, id="0", mkstream=True)
    ids = [f"orphan-{i}" for i in range(50)]
    entries = [sync_redis.xadd(queue, {"req": raw_request(i)}) for i in ids]
    delivered: Any = sync_redis.xreadgroup(CONSUMER_GROUP, "gone-host-0", {queue: ">"}, count=100)
    assert len(delivered[0][1]) == 50
    sync_redis.xdel(queue, entries[-1])  # trimmed by someone while pending
    start_pool(config, redis_url, devices="cpu", workers=1, env={"TQ_WORKER_CLAIM_IDLE_MS": "1000"})
    answers: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    collect(sync_redis, answers, statuses, until=49, timeout=60)
    assert set(answers) == set(ids[:-1])
    assert statuses == {"ok": 49}  # each answered exactly once
    wait_until(lambda: sync_redis.xlen(KEYS.dead("mlp")) == 1, 30, "one dead letter")
    letter = sync_redis.xrange(KEYS.dead("mlp"))[0][1]
    assert (letter[b"reason"], letter[b"entry"]) == (b"entry deleted while pending", entries[-1])
    wait_until(
        lambda: sync_redis.xpending(queue, CONSUMER_GROUP)["pending"] == 0, 30, "nothing pending"
    )


def test_a_killed_host_s_requests_are_answered_by_another(
    config: Path, redis_url: str, sync_redis: redis.Redis, start_pool: Callable[..., PoolHandle]
) -> None:
    """SIGKILL a whole pool (parent and worker) with a backlog in hand; a pool
    started afterwards (other consumer names) reclaims what the dead one held."""
    env = {"TQ_WORKER_CLAIM_IDLE_MS": "1000"}
    first = start_pool(config, redis_url, devices="cpu", workers=1, env=env)
    victims = [int(str(w["pid"])) for w in first.live_workers()]
    x = np.full((1, 3, 32, 32), 0.5, np.float32)
    ids = [f"host-{i}" for i in range(1500)]
    pipe = sync_redis.pipeline(transaction=False)
    for request_id in ids:
        request = Request(request_id, "cnn", {"x": x}, None, INBOX)
        pipe.xadd(KEYS.queue("cnn"), {"req": pack_request(request)})
    pipe.execute()
    answers: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    collect(sync_redis, answers, statuses, until=200, timeout=60)
    os.kill(first.process.pid, signal.SIGKILL)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    first.process.wait()
    first.stopped = True
    held = sync_redis.xpending(KEYS.queue("cnn"), CONSUMER_GROUP)["pending"]
    assert held > 0  # the dead worker held entries: only reclaim can answer them
    start_pool(config, redis_url, devices="cpu", workers=1, env=env)
    collect(sync_redis, answers, statuses, until=len(ids), timeout=120)
    assert set(answers) == set(ids)
    assert max(answers.values()) == 1, "a request was answered twice"
    assert statuses == {"ok": len(ids)}
    assert sync_redis.xpending(KEYS.queue("cnn"), CONSUMER_GROUP)["pending"] == 0


class Slow(torch.nn.Module):
    """Loops x[0, 0] times: as slow as the request asks, instant on warm-up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for _ in range(int(x[0, 0].item())):
            y = torch.tanh(y)
        return y[:, :10]


def test_a_batch_longer_than_the_visibility_timeout_keeps_its_lease(
    tmp_path: Path, models_dir: Path, redis_url: str, sync_redis: redis.Redis,
    start_pool: Callable[..., PoolHandle],
) -> None:  # fmt: skip
    """Batches taking several claim_idle_ms each, two workers watching each
    other's entries: lease renewal keeps them from being reclaimed, so no
    request is computed or answered twice."""
    torch.jit.script(Slow().eval()).save(str(tmp_path / "slow.pt"))  # type: ignore[no-untyped-call]
    slow_model = f"""
[[models]]
name = "slow"
path = "{tmp_path / "slow.pt"}"
max_batch_size = 1
max_delay_ms = 0
  [[models.inputs]]
  name = "x"
  dtype = "float32"
  shape = [256]
  [[models.outputs]]
  name = "y"
  dtype = "float32"
  shape = [10]
"""
    config = write_config(tmp_path / "slow.toml", models_dir, extra=slow_model)
    # The margin is wide on purpose: renewal runs every claim_idle_ms / 3, so a
    # reclaim needs the renewing loop to stall for 1.3 s, which a loaded CI
    # machine does not do, while each forward outlasts the timeout threefold.
    pool = start_pool(config, redis_url, env={"TQ_WORKER_CLAIM_IDLE_MS": "2000"})
    x = np.zeros((1, 256), np.float32)
    x[0, 0] = 12_000_000  # about 6 s of forward here: three visibility timeouts
    ids = [f"long-{i}" for i in range(4)]
    for request_id in ids:
        request = Request(request_id, "slow", {"x": x}, None, INBOX)
        sync_redis.xadd(KEYS.queue("slow"), {"req": pack_request(request)})
    answers: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    # a hang guard, not a timing bound: two ~6 s forwards per worker take
    # over 120 s with two CPU burners beside the suite (seen in a CI run)
    collect(sync_redis, answers, statuses, until=len(ids), timeout=240)
    assert pool.stop() == 0  # drained: a second computation would have been written by now
    for result in pop_results(sync_redis, 0.1):
        answers[result.id] += 1
    assert answers == {i: 1 for i in ids}
    assert statuses == {"ok": len(ids)}
    assert "reclaimed" not in pool.log_path.read_text()


def test_a_worker_whose_pool_died_drains_and_exits(
    config: Path, redis_url: str, start_pool: Callable[..., PoolHandle]
) -> None:
    pool = start_pool(config, redis_url, devices="cpu", workers=1)
    worker = int(str(pool.live_workers()[0]["pid"]))
    os.kill(pool.process.pid, signal.SIGKILL)
    pool.process.wait()
    pool.stopped = True

    def exited() -> bool:
        try:
            status = Path(f"/proc/{worker}/status").read_text()
        except FileNotFoundError:
            return True
        return "\nState:\tZ" in status  # exited, waiting for a reaper

    wait_until(exited, 30, "the orphaned worker to exit")
    assert "is gone" in pool.log()


class ReplyDropper:
    """A TCP proxy to a unix-socket Redis that, once, closes the connection
    instead of passing on a large reply (a delivery lost in transit)."""

    def __init__(self, upstream_path: str, threshold: int) -> None:
        self.upstream_path = upstream_path
        self.threshold = threshold
        self.dropped = threading.Event()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", 0)
        )
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self._loop.run_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(self.upstream_path)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, replies: bool) -> None:
            while data := await src.read(65536):
                if replies and len(data) > self.threshold and not self.dropped.is_set():
                    self.dropped.set()
                    break
                dst.write(data)
                await dst.drain()
            for side in (writer, up_writer):
                side.close()

        await asyncio.gather(
            pipe(reader, up_writer, False), pipe(up_reader, writer, True), return_exceptions=True
        )

    def stop(self) -> None:
        async def close_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


def test_a_delivery_lost_in_transit_is_read_again_at_once(
    config: Path, redis_url: str, sync_redis: redis.Redis, start_pool: Callable[..., PoolHandle]
) -> None:
    """The reply of an XREADGROUP is lost with its connection: the entries are
    delivered (pending) but never seen. The worker must notice (no transparent
    resend, which would hide the loss) and re-read its own pending entries,
    long before the visibility timeout would hand them to anyone."""
    proxy = ReplyDropper(redis_url.removeprefix("unix://"), threshold=4000)
    try:
        pool = start_pool(
            config, f"redis://127.0.0.1:{proxy.port}/0", devices="cpu", workers=1,
            env={"TQ_WORKER_CLAIM_IDLE_MS": "600000"},
        )  # fmt: skip
        ids = [f"transit-{i}" for i in range(8)]  # ~9 KB of entries: one large reply
        pipe = sync_redis.pipeline(transaction=False)
        for request_id in ids:
            pipe.xadd(KEYS.queue("mlp"), {"req": raw_request(request_id)})
        pipe.execute()
        answers: Counter[str] = Counter()
        statuses: Counter[str] = Counter()
        collect(sync_redis, answers, statuses, until=len(ids), timeout=60)
        assert proxy.dropped.is_set()  # the loss happened
        assert set(answers) == set(ids) and statuses == {"ok": len(ids)}
        assert pool.stop() == 0  # while the proxy still carries its connections
    finally:
        proxy.stop()


X_WIRE = encode_tensor(np.ones((1, 256), np.float32))
_GARBAGE = random.Random(7)


def _request(request_id: str, **fields: Any) -> dict[str, bytes]:
    body = {"id": request_id, "model": "mlp", "reply_to": INBOX, "inputs": {"x": X_WIRE}, **fields}
    return {"req": msgpack.packb(body, use_bin_type=True)}


# (what, stream entry for an id, whether its id can be read so it is answered);
# tests/unit/test_worker_parts.py checks each kind's exact answer on its own.
HOSTILE_ENTRIES: list[tuple[str, Callable[[str], dict[str, bytes]], bool]] = [
    ("random bytes", lambda _: {"req": _GARBAGE.randbytes(_GARBAGE.randint(0, 300))}, False),
    ("no req field", lambda _: {"other": b"field"}, False),
    ("a msgpack list", lambda _: {"req": msgpack.packb([1, 2, 3])}, False),
    ("no id", lambda _: {"req": msgpack.packb({"model": "mlp", "inputs": {"x": X_WIRE}})}, False),
    (
        "unknown dtype",
        lambda i: _request(
            i, inputs={"x": {"dtype": "complex128", "shape": [1, 256], "data": b""}}
        ),
        True,
    ),
    (
        "absurd shape",
        lambda i: _request(
            i, inputs={"x": {"dtype": "float32", "shape": [2**40, 2**40], "data": b""}}
        ),
        True,
    ),
    (
        "wrong shape",
        lambda i: _request(
            i, inputs={"x": {"dtype": "float32", "shape": [1, 255], "data": b"\0" * 1020}}
        ),
        True,
    ),
    ("inputs not a map", lambda i: _request(i, inputs="not a map"), True),
    ("another model", lambda i: _request(i, model="other"), True),
    ("deadline not a number", lambda i: _request(i, deadline="soon"), True),
]


def test_hostile_entries_never_kill_a_worker(
    config: Path, redis_url: str, sync_redis: redis.Redis, start_pool: Callable[..., PoolHandle]
) -> None:
    pool = start_pool(config, redis_url)
    pids = sorted(int(w["pid"]) for w in pool.live_workers())  # type: ignore[call-overload]
    good = [f"good-{i}" for i in range(1000)]
    answerable: list[str] = []  # garbage whose id can be read
    unreadable = 0
    entries: list[dict[str, bytes]] = []
    for i in range(1000):
        _, make, has_id = HOSTILE_ENTRIES[i % len(HOSTILE_ENTRIES)]
        entries.append(make(f"bad-{i}"))
        if has_id:
            answerable.append(f"bad-{i}")
        else:
            unreadable += 1
    mixed: list[dict[str, bytes]] = []
    for i, fields in enumerate(entries):
        mixed.append(fields)
        mixed.append({"req": raw_request(good[i])})
    pipe = sync_redis.pipeline(transaction=False)
    for fields in mixed:
        pipe.xadd(KEYS.queue("mlp"), fields)  # type: ignore[arg-type]
    pipe.execute()
    results: dict[str, Any] = {}
    wait_until(
        lambda: (
            results.update({r.id: r for r in pop_results(sync_redis, 1)})
            or len(results) >= len(good) + len(answerable)
        ),
        120,
        "all answerable results",
    )
    assert all(results[i].status == "ok" for i in good)
    assert all(results[i].status == "error" for i in answerable)
    codes = Counter(results[i].error_code for i in answerable)
    assert set(codes) <= {"protocol_error", "invalid_input"}
    assert sync_redis.xlen(KEYS.dead("mlp")) == unreadable
    assert sync_redis.xlen(KEYS.queue("mlp")) == 0
    assert sorted(int(w["pid"]) for w in pool.live_workers()) == pids  # type: ignore[call-overload]


def test_a_reply_to_that_is_no_inbox_is_refused_and_touches_nothing(
    config: Path, redis_url: str, sync_redis: redis.Redis, start_pool: Callable[..., PoolHandle]
) -> None:
    start_pool(config, redis_url, devices="cpu", workers=1)
    queue = KEYS.queue("mlp")
    x = np.full((1, 256), 0.5, np.float32)
    for request_id, reply_to in [("at-the-stream", queue), ("empty", "tq:inbox:"), ("ok", INBOX)]:
        request = Request(request_id, "mlp", {"x": x}, None, reply_to)
        sync_redis.xadd(queue, {"req": pack_request(request)})
    answers: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    collect(sync_redis, answers, statuses, until=1, timeout=60)
    assert answers == {"ok": 1} and statuses == {"ok": 1}  # only the inbox got a push
    for request_id in ("at-the-stream", "empty"):
        key = KEYS.result(request_id)
        wait_until(lambda k=key: bool(sync_redis.exists(k)), 30, "stored answer")  # type: ignore[misc]
        stored = unpack_result(sync_redis.get(key))  # type: ignore[arg-type]
        assert (stored.status, stored.error_code) == ("error", "invalid_input")
        assert "is not an inbox key" in stored.error_message
    assert sync_redis.type(queue) == b"stream"
    assert sync_redis.ttl(queue) == -1  # not made to expire


def test_poison_request_goes_to_dead_letters_and_spares_its_batch(
    config: Path, redis_url: str, sync_redis: redis.Redis, start_pool: Callable[..., PoolHandle]
) -> None:
    start_pool(
        config, redis_url, devices="cpu", workers=1,
        env={"TQ_WORKER_CRASH_ON_REQUEST_PREFIX": "poison-"},
    )  # fmt: skip
    ids = [f"n-{i}" for i in range(40)]
    ids.insert(20, "poison-1")  # in the middle of the same batch
    pipe = sync_redis.pipeline(transaction=False)
    for request_id in ids:
        pipe.xadd(KEYS.queue("mlp"), {"req": raw_request(request_id)})
    pipe.execute()
    results: dict[str, Any] = {}
    wait_until(
        lambda: (
            results.update({r.id: r for r in pop_results(sync_redis, 1)})
            or len(results) >= len(ids)
        ),
        180,
        "every result, the poison one included",
    )
    assert all(results[i].status == "ok" for i in ids if i != "poison-1")
    poison = results["poison-1"]
    assert (poison.status, poison.error_code) == ("error", "poison")
    letters = sync_redis.xrange(KEYS.dead("mlp"))
    assert len(letters) == 1
    assert b"delivered 3 times" in letters[0][1][b"reason"]
    assert msgpack.unpackb(letters[0][1][b"req"], raw=False)["id"] == "poison-1"


async def test_expired_request_is_answered_without_compute(
    config: Path, redis_url: str, sync_redis: redis.Redis, start_pool: Callable[..., PoolHandle]
) -> None:
    start_pool(config, redis_url)
    past = int(time.time() * 1000) - 10_000
    sync_redis.xadd(KEYS.queue("mlp"), {"req": raw_request("late", deadline_ms=past)})
    sync_redis.xadd(KEYS.queue("mlp"), {"req": raw_request("timely")})
    results = {r.id: r for r in wait_until(lambda: pop_results(sync_redis, 1), 60, "results")}  # type: ignore[union-attr]
    while len(results) < 2:
        results.update({r.id: r for r in pop_results(sync_redis, 5)})
    assert results["late"].status == "expired"
    assert results["late"].batch_size == 0 and not results["late"].outputs  # no compute
    assert results["timely"].status == "ok"
    async with AsyncClient(redis_url) as client:
        with pytest.raises(RequestTimeout, match="deadline"):
            await client.result("late", timeout=5)  # an expired result is a timeout


async def test_deadline_is_written_into_the_request(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    spec = ModelSpec("m", (TensorSpec("x", "float32", (2,)),), (TensorSpec("y", "float32", (2,)),))
    sync_redis.hset(KEYS.models, "m", spec.to_json())
    async with AsyncClient(redis_url) as client:
        before = time.time() * 1000
        await client.submit("m", {"x": np.ones((1, 2), np.float32)}, timeout=7)
        after = time.time() * 1000
    entry = sync_redis.xrange(KEYS.queue("m"))[0][1][b"req"]
    deadline = msgpack.unpackb(entry, raw=False)["deadline"]
    assert int(before) + 7000 <= deadline <= int(after) + 7000


async def test_cancel_skips_a_queued_request(
    config: Path, redis_url: str, sync_redis: redis.Redis, start_pool: Callable[..., PoolHandle]
) -> None:
    # Cancelled before any worker runs: the key path (enqueued before the
    # workers subscribed to the cancel feed).
    pool = start_pool(config, redis_url)
    pool.stop()
    async with AsyncClient(redis_url) as client:
        early = await client.submit("mlp", {"x": np.ones((1, 256), np.float32)})
        await client.cancel(early)
        pool = start_pool(config, redis_url)
        result = await client.wait(early, timeout=60)
        assert result.status == "cancelled"
        # Cancelled while queued behind a backlog: the pub/sub path.
        backlog = await client.submit_many(
            [Submission("cnn", {"x": np.ones((4, 3, 32, 32), np.float32)}) for _ in range(600)]
        )
        late = await client.submit("cnn", {"x": np.ones((1, 3, 32, 32), np.float32)})
        await client.cancel(late)
        result = await client.wait(late, timeout=120)
        assert result.status == "cancelled"
        assert result.batch_size == 0  # skipped, not computed
        done = [await client.wait(i, timeout=120) for i in backlog]
        assert {r.status for r in done} == {"ok"}


async def test_queue_full_refuses_and_trims_nothing(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    spec = ModelSpec(
        "small",
        (TensorSpec("x", "float32", (2,)),),
        (TensorSpec("y", "float32", (2,)),),
        extra={"max_queue_len": 5},
    )
    sync_redis.hset(KEYS.models, "small", spec.to_json())  # no worker: nothing drains
    x = np.ones((1, 2), np.float32)
    async with AsyncClient(redis_url) as client:
        accepted = [await client.submit("small", {"x": x}) for _ in range(5)]
        with pytest.raises(QueueFull) as info:
            await client.submit("small", {"x": x})
        assert info.value.request_id is not None
        with pytest.raises(QueueFull) as many:
            await client.submit_many([Submission("small", {"x": x}) for _ in range(3)])
        assert len(many.value.refused) == 3
    entries = sync_redis.xrange(KEYS.queue("small"))
    assert [msgpack.unpackb(e[1][b"req"], raw=False)["id"] for e in entries] == accepted


def test_high_priority_overtakes_a_normal_backlog(
    config: Path, redis_url: str, sync_redis: redis.Redis, start_pool: Callable[..., PoolHandle]
) -> None:
    start_pool(config, redis_url, devices="cpu", workers=1)
    x = np.ones((4, 3, 32, 32), np.float32)
    pipe = sync_redis.pipeline(transaction=False)
    for i in range(400):
        request = Request(f"normal-{i}", "cnn", {"x": x}, reply_to=INBOX)
        pipe.xadd(KEYS.queue("cnn"), {"req": pack_request(request)})
    pipe.execute()
    wait_until(lambda: sync_redis.llen(INBOX) > 0, 60, "the backlog under way")
    for i in range(10):
        request = Request(f"high-{i}", "cnn", {"x": x[:1]}, reply_to=INBOX, priority=1)
        sync_redis.xadd(KEYS.queue("cnn", priority=1), {"req": pack_request(request)})
    order: list[str] = []
    while len(order) < 410:
        order += [r.id for r in pop_results(sync_redis, 5)]
    last_high = max(i for i, request_id in enumerate(order) if request_id.startswith("high-"))
    print(f"priority: last high-priority result at position {last_high} of {len(order)}")
    assert last_high < 200  # served long before the normal backlog drained


async def test_priority_requests_go_to_the_high_stream(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    spec = ModelSpec("m", (TensorSpec("x", "float32", (2,)),), (TensorSpec("y", "float32", (2,)),))
    sync_redis.hset(KEYS.models, "m", spec.to_json())
    async with AsyncClient(redis_url) as client:
        urgent = await client.submit("m", {"x": np.ones((1, 2), np.float32)}, priority=1)
        await client.submit("m", {"x": np.ones((1, 2), np.float32)})
    high = sync_redis.xrange(KEYS.queue("m", priority=1))
    assert [msgpack.unpackb(e[1][b"req"], raw=False)["id"] for e in high] == [urgent]
    assert sync_redis.xlen(KEYS.queue("m")) == 1
