"""Redis faults: restarts mid-run (with and without persistence), password
and ACL URLs, a failed result write, and what `tensorq status` reports."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from common.embedded_redis import EmbeddedRedis
from common.errors import RedisUnavailable, RequestTimeout
from common.keys import CONSUMER_GROUP, Keys
from common.redis_conn import pooled_client
from common.settings import load_settings
from producer import AsyncClient, Client, Submission
from tests.conftest import (
    ROOT,
    PoolHandle,
    async_wait_until,
    entry_requests,
    wait_until,
    write_config,
)

if TYPE_CHECKING:
    from worker.batching import Assembled
    from worker.commit import Committer
    from worker.executor import Executor
    from worker.service import WorkerParts, WorkerService
    from worker.work import Outcome

KEYS = Keys()
X = np.ones((1, 256), np.float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def config(tmp_path: Path, models_dir: Path) -> Path:
    return write_config(tmp_path / "tensorq.toml", models_dir)


@pytest.mark.parametrize("persistent", [False, True], ids=["no-persistence", "appendonly"])
async def test_redis_restart_mid_run(
    persistent: bool, tmp_path: Path, config: Path, start_pool: Callable[..., PoolHandle]
) -> None:
    args = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else []
    directory = tmp_path / "redis"
    directory.mkdir()
    server = EmbeddedRedis(directory=directory, extra_args=args)
    url = server.start()
    try:
        pool = start_pool(config, url)
        pids = sorted(int(w["pid"]) for w in pool.live_workers())  # type: ignore[call-overload]
        async with AsyncClient(url) as client:
            ids = await client.submit_many(
                [Submission("cnn", {"x": np.ones((2, 3, 32, 32), np.float32)}) for _ in range(1500)]
            )
            probe = redis.Redis.from_url(url)
            await async_wait_until(lambda: probe.exists(KEYS.result(ids[0])), 60, "work under way")
            probe.close()
            server.stop()
            server.start()
            outcomes = await asyncio.gather(
                *(client.wait(i, timeout=40) for i in ids), return_exceptions=True
            )
            ok = sum(1 for o in outcomes if not isinstance(o, BaseException) and o.status == "ok")
            timeouts = sum(1 for o in outcomes if isinstance(o, RequestTimeout))
            print(f"restart (persistent={persistent}): {ok} ok, {timeouts} clear timeouts")
            assert ok + timeouts == len(ids)  # nothing else: no hang, no other error
            if persistent:
                assert ok == len(ids)  # the stream and its pending entries survived
            # the pool carries on after the restart, with the same processes
            after = [await client.infer("mlp", {"x": X}, timeout=60) for _ in range(20)]
            assert all(a["y"].shape == (1, 10) for a in after)
        assert pool.process.poll() is None
        wait_until(lambda: len(pool.live_workers()) == 2, 30, "heartbeats again")
        assert sorted(int(w["pid"]) for w in pool.live_workers()) == pids  # type: ignore[call-overload]
    finally:
        server.stop()


def test_password_and_acl_urls(
    tmp_path: Path, config: Path, start_pool: Callable[..., PoolHandle]
) -> None:
    port = free_port()
    acl = ["--user", "alice", "on", ">alicepw", "~*", "&*", "+@all"]
    server = EmbeddedRedis(
        port=port, password="s3cret", extra_args=["--requirepass", "s3cret", *acl]
    )
    server.start()
    try:
        url = f"redis://:s3cret@127.0.0.1:{port}/0"
        start_pool(config, url)
        for good in (url, f"redis://alice:alicepw@127.0.0.1:{port}/0"):
            with Client(good) as client:
                assert client.infer("mlp", {"x": X}, timeout=30)["y"].shape == (1, 10)
        wrong = f"redis://:hunter2@127.0.0.1:{port}/0"
        with pytest.raises(RedisUnavailable) as info:
            asyncio.run(AsyncClient(wrong).connect())
        assert "hunter2" not in str(info.value) and "***" in str(info.value)
        run = subprocess.run(
            [sys.executable, "-m", "common.cli", "worker", "--config", str(config),
             "--redis", wrong, "--devices", "cpu"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert run.returncode != 0
        assert "refused the credentials" in run.stderr
        assert "hunter2" not in run.stdout + run.stderr
        unreachable = subprocess.run(
            [sys.executable, "-m", "common.cli", "worker", "--config", str(config),
             "--redis", f"redis://:pw@127.0.0.1:{free_port()}/0", "--devices", "cpu"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert unreachable.returncode != 0
        assert "cannot reach Redis" in unreachable.stderr
    finally:
        server.stop()


class InProcessWorker:
    """A worker serving ``mlp`` inside the test's own event loop, so a test
    can hand it an instrumented part; ``service()`` makes one (again: a
    restart under the same consumer name)."""

    def __init__(
        self, tmp_path: Path, models_dir: Path, redis_url: str, **overrides: object
    ) -> None:
        from worker.executor import Executor
        from worker.registry import load_model

        self.settings = load_settings(
            write_config(tmp_path / "t.toml", models_dir),
            overrides={"redis.url": redis_url, **overrides},
        )
        self.model = load_model(self.settings.model("mlp"), "cpu", Executor("cpu").warm_up)
        self.connection = pooled_client(self.settings.redis)

    def service(
        self, *, executor: Executor | None = None, committer: Committer | None = None
    ) -> tuple[WorkerService, WorkerParts]:
        from worker.executor import Executor
        from worker.service import WorkerService, build_parts

        service = WorkerService(self.settings, self.connection, "in-process")
        parts = build_parts(
            settings=self.settings, redis=self.connection, models=[self.model],
            executor=executor or Executor("cpu"), name="in-process",
            device_info={"device": "cpu:0"}, on_orphaned=service.request_stop,
            committer=committer,
        )  # fmt: skip
        return service, parts


async def test_failed_result_write_leaves_the_request_pending_then_answers_it(
    tmp_path: Path, models_dir: Path, redis_url: str, sync_redis: redis.Redis
) -> None:
    from worker.commit import Committer

    worker = InProcessWorker(tmp_path, models_dir, redis_url)
    connection = worker.connection
    pending_at_write: list[int] = []

    class FlakyCommitter(Committer):
        async def commit(self, outcomes: Sequence[Outcome]) -> int:
            summary = await connection.xpending(KEYS.queue("mlp"), CONSUMER_GROUP)
            pending_at_write.append(int(summary["pending"]))
            if len(pending_at_write) == 1:
                raise RedisConnectionError("injected: connection lost during the result write")
            return await super().commit(outcomes)

    service, parts = worker.service(committer=FlakyCommitter(connection, KEYS, 60))
    task = asyncio.create_task(service.run(parts))
    await async_wait_until(lambda: sync_redis.hexists(KEYS.models, "mlp"), 30, "model published")
    async with AsyncClient(redis_url) as client:
        out = await client.infer("mlp", {"x": X}, timeout=30)
    service.request_stop()
    await task
    await connection.aclose()
    assert out["y"].shape == (1, 10)
    assert pending_at_write == [1, 1]  # unacked while the write failed, answered on retry
    assert sync_redis.xpending(KEYS.queue("mlp"), CONSUMER_GROUP)["pending"] == 0


def test_status_reports_queues_and_workers(
    config: Path, redis_url: str, sync_redis: redis.Redis, start_pool: Callable[..., PoolHandle]
) -> None:
    pool = start_pool(config, redis_url)
    sync_redis.xadd(KEYS.dead("mlp"), {"req": b"", "reason": "test"})
    run = subprocess.run(
        [sys.executable, "-m", "common.cli", "status", "--redis", redis_url, "--json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert set(report["models"]) == {"mlp", "cnn", "seq", "encoder"}
    assert report["models"]["mlp"]["dead_letters"] == 1
    assert report["models"]["cnn"]["queued"] == 0
    assert sorted(w["device"] for w in report["workers"]) == ["cpu:0", "cpu:1"]
    assert all(w["alive"] for w in report["workers"])
    pool.stop()
    text = subprocess.run(
        [sys.executable, "-m", "common.cli", "status", "--redis", redis_url],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    ).stdout  # fmt: skip
    assert "mlp" in text and " no " in text  # stopped workers show as not alive


async def test_a_failed_side_loop_drains_the_worker_and_reports_it(
    tmp_path: Path, models_dir: Path, redis_url: str, sync_redis: redis.Redis
) -> None:
    """A loop that raises past its own retries (here: reclaim) does not leave
    the worker serving without it: it drains, answering what it holds, and
    ``failure`` makes the worker process exit non-zero for the pool to restart."""
    worker = InProcessWorker(tmp_path, models_dir, redis_url, **{"worker.claim_idle_ms": 200})
    service, parts = worker.service()
    sync_redis.hset(KEYS.models, "mlp", worker.model.spec.to_json())  # as the worker will
    async with AsyncClient(redis_url) as client:
        ids = await client.submit_many([Submission("mlp", {"x": X}) for _ in range(20)])
        reclaims = 0

        async def broken_reclaim(*args: object) -> int:
            nonlocal reclaims
            reclaims += 1
            raise KeyError("injected: a bug in reclaim")

        parts.upkeep.reclaim = broken_reclaim  # type: ignore[method-assign,assignment]
        await asyncio.wait_for(service.run(parts), 30)  # returns by itself: no request_stop
        results = [await client.wait(i, timeout=10) for i in ids]
    await worker.connection.aclose()
    assert reclaims == 1
    assert isinstance(service.failure, KeyError)
    assert [r.status for r in results] == ["ok"] * 20
    assert sync_redis.xpending(KEYS.queue("mlp"), CONSUMER_GROUP)["pending"] == 0


def test_a_worker_restarted_while_redis_is_down_waits_for_it(
    tmp_path: Path, config: Path, start_pool: Callable[..., PoolHandle]
) -> None:
    """A worker that served, died, and cannot reach Redis on restart is
    retried with backoff: the pool does not take it for a bad config."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = EmbeddedRedis(directory=directory)
    url = server.start()
    try:
        pool = start_pool(config, url, devices="cpu", workers=1)
        victim = int(str(pool.live_workers()[0]["pid"]))
        server.stop()
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: "cannot reach Redis" in pool.log(), 60, "a restart that fails")
        assert pool.process.poll() is None  # the pool carries on
        server.start()
        wait_until(lambda: len(pool.live_workers()) == 1, 90, "the worker back, serving")
        with Client(url) as client:
            out = client.infer("mlp", {"x": X}, timeout=60)
        assert out["y"].shape == (1, 10)
        assert pool.process.poll() is None
    finally:
        server.stop()


async def test_a_failed_batch_loop_drains_and_a_restart_answers_everything(
    tmp_path: Path, models_dir: Path, redis_url: str, sync_redis: redis.Redis
) -> None:
    """Anything escaping the batch loop (here: assembling a batch) stops the
    worker instead of leaving it reading and renewing leases on requests it
    will never compute; its restart under the same name answers them."""
    worker = InProcessWorker(tmp_path, models_dir, redis_url)
    sync_redis.hset(KEYS.models, "mlp", worker.model.spec.to_json())
    async with AsyncClient(redis_url) as client:
        ids = await client.submit_many([Submission("mlp", {"x": X}) for _ in range(20)])
        from worker.executor import Executor

        class FailingExecutor(Executor):
            def assemble(self, *args: object) -> Assembled:
                raise MemoryError("injected: cannot allocate the staging buffer")

        broken, broken_parts = worker.service(executor=FailingExecutor("cpu"))
        await asyncio.wait_for(broken.run(broken_parts), 30)  # stops by itself
        assert isinstance(broken.failure, MemoryError)
        pending: Any = sync_redis.xpending_range(KEYS.queue("mlp"), CONSUMER_GROUP, "-", "+", 100)
        held = [sync_redis.xrange(KEYS.queue("mlp"), p["message_id"], p["message_id"])
                for p in pending]  # fmt: skip
        assert sorted(r.id for [(_, f)] in held for r in entry_requests(f[b"req"])) == sorted(ids)
        restarted, parts = worker.service()
        task = asyncio.create_task(restarted.run(parts))
        results = [await client.wait(i, timeout=30) for i in ids]
        restarted.request_stop()
        await task
    await worker.connection.aclose()
    assert [r.status for r in results] == ["ok"] * 20
    assert restarted.failure is None


async def test_a_commit_of_ten_thousand_results_acks_them_all(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    """Past Lua's unpack limit (about 8,000 values) the acks and the inbox
    elements go in chunks."""
    from worker.commit import CommitPlan, Committer

    queue = KEYS.queue("mlp")
    sync_redis.xgroup_create(queue, CONSUMER_GROUP, id="0", mkstream=True)
    pipe = sync_redis.pipeline(transaction=False)
    for _ in range(10_000):
        pipe.xadd(queue, {"req": b"r"})
    entries = pipe.execute()
    sync_redis.xreadgroup(CONSUMER_GROUP, "w", {queue: ">"}, count=10_000)
    connection = pooled_client(load_settings(env={}, overrides={"redis.url": redis_url}).redis)
    plan = CommitPlan(
        stored=[(f"big-{i}", b"x") for i in range(10_000)],
        pushes={KEYS.inbox("big"): [b"x"] * 10_000},
        acks={queue: (10_000, entries)},
    )
    assert await Committer(connection, KEYS, 60).commit(plan) == 0
    await connection.aclose()
    assert sync_redis.xpending(queue, CONSUMER_GROUP)["pending"] == 0
    assert sync_redis.xlen(queue) == 0
    assert sync_redis.exists(KEYS.result("big-9999"))
    assert sync_redis.llen(KEYS.inbox("big")) == 10_000


async def test_waits_end_on_time_while_redis_is_stalled(tmp_path: Path, models_dir: Path) -> None:
    """A Redis that stops answering (here: SIGSTOPped) must not stretch a
    wait's timeout by the client's connection retries (it did: minutes)."""

    directory = tmp_path / "redis"
    directory.mkdir()
    server = EmbeddedRedis(directory=directory)
    url = server.start()
    settings = load_settings(
        write_config(tmp_path / "t.toml", models_dir), overrides={"redis.url": url}
    )
    spec = settings.model("mlp").spec("v")
    assert server.process is not None
    try:
        redis.Redis.from_url(url).hset(KEYS.models, "mlp", spec.to_json())
        async with AsyncClient(url) as client:
            request_id = await client.submit("mlp", {"x": X})  # no worker: never answered
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                for waited in (request_id, "another-clients-request"):
                    with pytest.raises(RequestTimeout):
                        await asyncio.wait_for(client.wait(waited, timeout=1), 20)
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
    finally:
        server.stop()


def test_closing_a_sync_client_ends_the_calls_other_threads_wait_in(redis_url: str) -> None:
    import threading

    from common.errors import TensorQError

    threads_before = threading.active_count()
    with pytest.raises(TensorQError):
        Client("")  # no URL: refused before any thread starts
    assert threading.active_count() == threads_before
    client = Client(redis_url)
    outcome: list[BaseException] = []
    with redis.Redis.from_url(redis_url) as probe:  # accepted, never answered: the wait
        probe.set(KEYS.accepted("nobody-will-answer"), b"{}")  # blocks (an unknown id would not)

    def waiter() -> None:
        try:
            client.wait("nobody-will-answer", timeout=None)
        except BaseException as exc:  # the outcome is the assertion
            outcome.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    # the wait is under way on the client's loop (its only task: nothing submitted)
    wait_until(lambda: bool(asyncio.all_tasks(client._loop)), 10, "the wait under way")
    client.close()
    client.close()  # twice is harmless
    thread.join(20)
    assert not thread.is_alive(), "a call outlived close()"
    assert len(outcome) == 1 and isinstance(outcome[0], TensorQError)
    assert "closed" in str(outcome[0])


async def test_a_client_follows_a_model_whose_signature_changed(
    redis_url: str, sync_redis: redis.Redis
) -> None:
    """A hot reload may change a model's input shape under a live client: the
    client re-reads the registry before refusing. An unreadable registry
    entry is skipped, not fatal to every lookup."""
    from common.errors import InvalidInput
    from common.spec import ModelSpec, TensorSpec

    def spec(width: int) -> ModelSpec:
        return ModelSpec("m", (TensorSpec("x", "float32", (width,)),),
                         (TensorSpec("y", "float32", (2,)),))  # fmt: skip

    sync_redis.hset(KEYS.models, mapping={"m": spec(4).to_json(), "broken": "{not json"})
    async with AsyncClient(redis_url) as client:
        await client.submit("m", {"x": np.ones((1, 4), np.float32)})
        sync_redis.hset(KEYS.models, "m", spec(8).to_json())  # the reload
        await client.submit("m", {"x": np.ones((1, 8), np.float32)})
        with pytest.raises(InvalidInput, match="shape"):  # the old shape is now refused
            await client.submit("m", {"x": np.ones((1, 4), np.float32)})
        assert set(await client.models(refresh=True)) == {"m"}
    assert sync_redis.xlen(KEYS.queue("m")) == 2
