"""Scale-out on a real 3-master Redis Cluster (started by the fixture on
loopback ports): two worker pools with their own configs, as if on two
hosts, serve two models; a worker is killed mid-run and nothing is lost.
Also: the key builder keeps each model's keys and each request's keys in
one slot, and leaves single-node names untouched."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from redis.cluster import key_slot

from common.errors import RedisUnavailable, RequestTimeout
from common.keys import Keys
from common.redis_conn import pooled_client
from common.redis_url import mask_url
from common.settings import RedisSettings, load_settings
from producer import AsyncClient, Submission
from producer.ops.status import collect_status
from tests.cluster import local_cluster
from tests.conftest import PoolHandle, async_wait_until, sync_client

MODELS = """
[[models]]
name = "mlp"
path = "{models}/mlp.pt"
max_batch_size = {batch}
  [[models.inputs]]
  name = "x"
  dtype = "float32"
  shape = [256]
  [[models.outputs]]
  name = "y"
  dtype = "float32"
  shape = [10]

[[models]]
name = "seq"
path = "{models}/seq.pt"
max_batch_size = {batch}
  [[models.inputs]]
  name = "tokens"
  dtype = "int64"
  shape = [-1]
  pad_value = 0
  [[models.outputs]]
  name = "pooled"
  dtype = "float32"
  shape = [16]
  [[models.outputs]]
  name = "scores"
  dtype = "float32"
  shape = [-1]
"""


def slot(key: str) -> int:
    return int(key_slot(key.encode()))


def test_single_node_key_names_are_unchanged() -> None:
    keys = Keys.of(RedisSettings(url="redis://h:6379/0"))
    assert not keys.cluster
    assert (keys.queue("mlp"), keys.queue("mlp", 1)) == ("tq:q:mlp", "tq:q:mlp:high")
    assert (keys.dead("mlp"), keys.result("r1")) == ("tq:dead:mlp", "tq:r:r1")


def test_cluster_keys_share_a_slot_per_model_and_per_request() -> None:
    keys = Keys.of(RedisSettings(url="redis+cluster://a:1,b:2"))
    assert keys.cluster
    assert keys.queue("mlp") == "tq:q:{mlp}"
    model_keys = [keys.queue("mlp"), keys.queue("mlp", 1), keys.dead("mlp")]
    assert len({slot(k) for k in model_keys}) == 1
    request_keys = [keys.result("r-7"), keys.cancelled("r-7"), keys.accepted("r-7")]
    assert len({slot(k) for k in request_keys}) == 1
    # results are spread over the cluster by id
    assert len({slot(keys.result(f"r-{i}")) for i in range(100)}) > 90
    assert Keys.of(RedisSettings(url="redis://h:1", cluster=True)).cluster


def test_cluster_url_from_env_and_masked() -> None:
    url = "redis+cluster://app:s3cret@10.0.0.1:7000,10.0.0.2:7000"
    settings = load_settings(env={"TQ_REDIS_URL": url})
    assert settings.redis.is_cluster
    masked = mask_url(url)
    assert "s3cret" not in masked
    assert masked == "redis+cluster://app:***@10.0.0.1:7000,10.0.0.2:7000"


async def test_unreachable_cluster_is_a_clear_error_without_the_password() -> None:
    url = "redis+cluster://app:s3cret@127.0.0.1:1,127.0.0.1:2"
    with pytest.raises(RedisUnavailable) as caught:
        await collect_status(load_settings(env={}, overrides={"redis.url": url}))
    message = str(caught.value)
    assert "redis+cluster://app:***@127.0.0.1:1,127.0.0.1:2" in message
    assert "s3cret" not in message


async def test_redis_py_attribute_errors_mid_failover_become_connection_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """redis-py's cluster client can fail with AttributeError while the
    topology changes (redis/redis-py#3835); ours raises the ConnectionError
    that every retry loop here handles."""
    from redis.asyncio.cluster import ClusterPipeline, RedisCluster
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def discarded_connection(*args: object, **kwargs: object) -> None:
        raise AttributeError("'NoneType' object has no attribute 'writelines'")

    monkeypatch.setattr(RedisCluster, "execute_command", discarded_connection)
    monkeypatch.setattr(ClusterPipeline, "execute", discarded_connection)
    settings = load_settings(env={}, overrides={"redis.url": "redis+cluster://127.0.0.1:1"})
    client = pooled_client(settings.redis)  # connects lazily: nothing is reached here
    with pytest.raises(RedisConnectionError, match="cluster node lost mid-command"):
        await client.get("k")
    with pytest.raises(RedisConnectionError, match="cluster node lost mid-pipeline"):
        pipe = client.pipeline(transaction=False)
        pipe.get("k")
        await pipe.execute()


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with local_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster.url


def host_config(directory: Path, models_dir: Path, *, batch: int, worker: str) -> Path:
    """One 'host': its own config file (worker section and batch sizes differ)."""
    directory.mkdir()
    path = directory / "tensorq.toml"
    path.write_text(f"[worker]\n{worker}\n" + MODELS.format(models=models_dir, batch=batch))
    return path


def direct(module: torch.jit.ScriptModule, *inputs: np.ndarray) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        out = module(*(torch.from_numpy(a) for a in inputs))
    return out if isinstance(out, tuple) else (out,)


async def test_two_hosts_on_a_cluster_lose_nothing_when_a_worker_dies(
    cluster_url: str, tmp_path: Path, models_dir: Path, start_pool: Callable[..., PoolHandle]
) -> None:
    host_a = host_config(tmp_path / "a", models_dir, batch=64, worker="block_ms = 500")
    host_b = host_config(tmp_path / "b", models_dir, batch=32, worker="block_ms = 250")
    pool_a = start_pool(host_a, cluster_url, devices="cpu", workers=1)
    pool_b = start_pool(host_b, cluster_url, devices="cpu", workers=1, wait=False)
    pool_b.workers = 2  # both hosts' workers are listed in the one tq:workers
    pool_b.wait_ready()

    rng = np.random.default_rng(11)
    total = 10_000
    inputs: list[tuple[str, dict[str, np.ndarray]]] = []
    for i in range(total):
        if i % 2:
            inputs.append(("mlp", {"x": rng.standard_normal((1, 256)).astype(np.float32)}))
        else:
            length = int(rng.integers(1, 24))
            inputs.append(("seq", {"tokens": rng.integers(1, 1000, (1, length)).astype(np.int64)}))

    victim = int(pool_a.live_workers()[0]["pid"])  # type: ignore[call-overload]
    async with AsyncClient(cluster_url) as client:
        ids: list[str] = []
        for start in range(0, total, 500):
            chunk = inputs[start : start + 500]
            ids += await client.submit_many([Submission(m, arrays) for m, arrays in chunk])
            if start == 3000:  # mid-run, with a backlog in both streams
                os.kill(victim, signal.SIGKILL)
        results = await asyncio.gather(*(client.wait(i, timeout=240) for i in ids))
        status = await collect_status(load_settings(overrides={"redis.url": cluster_url}))

    assert [r.status for r in results] == ["ok"] * total
    modules = {m: torch.jit.load(str(models_dir / f"{m}.pt")) for m in ("mlp", "seq")}
    for (model, arrays), result in zip(inputs, results, strict=True):
        expected = direct(modules[model], *arrays.values())
        names = ["y"] if model == "mlp" else ["pooled", "scores"]
        for name, want in zip(names, expected, strict=True):
            np.testing.assert_allclose(result.outputs[name], want.numpy(), rtol=1e-4, atol=1e-5)
    workers = {r.worker for r in results}
    print(f"cluster: {total} ok from workers {sorted(workers)}")
    assert len(workers) == 2  # both hosts served (a restarted worker keeps its name)
    assert victim not in {int(w["pid"]) for w in pool_a.live_workers()}  # type: ignore[call-overload]
    # nothing left queued, pending or dead on any node
    for model in ("mlp", "seq"):
        row = status["models"][model]
        assert (row["queued"], row["pending"], row["dead_letters"]) == (0, 0, 0), row
    for pool in (pool_a, pool_b):
        assert pool.process.poll() is None


async def test_poison_and_cancel_on_a_cluster(
    cluster_url: str, tmp_path: Path, models_dir: Path, start_pool: Callable[..., PoolHandle]
) -> None:
    """The paths that write across slots outside the batch commit: a poison
    request's dead letter plus its answer, and a cancelled request."""
    config = host_config(
        tmp_path / "c", models_dir, batch=64, worker='crash_on_request_prefix = "poison-"'
    )
    pool = start_pool(config, cluster_url, devices="cpu", workers=1)
    keys = Keys.of(RedisSettings(url=cluster_url))
    x = np.ones((1, 256), np.float32)
    async with AsyncClient(cluster_url) as client:
        poison = await client.submit("mlp", {"x": x}, request_id="poison-1")
        poisoned = await client.wait(poison, timeout=120)
        assert (poisoned.status, poisoned.error_code) == ("error", "poison")
        pool.stop()
        cancelled = await client.submit("mlp", {"x": x})
        await client.cancel(cancelled)
        pool = start_pool(config, cluster_url, devices="cpu", workers=1)
        assert (await client.wait(cancelled, timeout=60)).status == "cancelled"
        ok = await client.infer("mlp", {"x": x}, timeout=60)
        kept = await client.submit_many([Submission("mlp", {"x": x}) for _ in range(30)])
        for request_id in kept:
            await client.wait(request_id, timeout=60)
    assert ok["y"].shape == (1, 10)
    sync = sync_client(cluster_url)
    try:
        dead = sync.xrange(keys.dead("mlp"))
        assert len(dead) == 1 and b"delivered" in dead[0][1][b"reason"]
        await async_wait_until(lambda: sync.xlen(keys.queue("mlp")) == 0, 30, "queue drained")
        # collected results, their keys spread over the nodes by id: each
        # node got its share of the client's pipelined EXPIREs
        collected = [poison, cancelled, *kept]
        assert len({sync.keyslot(keys.result(i)) for i in collected}) > 1
        await async_wait_until(
            lambda: all(0 < sync.ttl(keys.result(i)) <= 60 for i in collected),
            30,
            "collected results shortened",
        )
    finally:
        sync.close()
    assert pool.process.poll() is None


async def test_gateway_on_a_cluster(
    cluster_url: str, tmp_path: Path, models_dir: Path, start_pool: Callable[..., PoolHandle]
) -> None:
    """OIP infer, async submit with a client id (the accept check is one
    transaction: its keys share the id's slot), long-poll, reuse and cancel."""
    import aiohttp

    from producer.gateway import start

    config = host_config(tmp_path / "g", models_dir, batch=64, worker="")
    start_pool(config, cluster_url, devices="cpu", workers=1)
    settings = load_settings(
        config, env={}, overrides={"redis.url": cluster_url, "gateway.port": 0}
    )
    running = await start(settings)
    x = np.arange(256, dtype=np.float32).reshape(1, 256) / 256
    want = direct(torch.jit.load(str(models_dir / "mlp.pt")), x)[0].numpy()
    tensor = {"name": "x", "shape": [1, 256], "datatype": "FP32", "data": x.ravel().tolist()}
    try:
        async with aiohttp.ClientSession(running.url) as http:
            async with http.post("/v2/models/mlp/infer", json={"inputs": [tensor]}) as reply:
                assert reply.status == 200, await reply.text()
                body = await reply.json()
            got = np.array(body["outputs"][0]["data"], np.float32).reshape(1, 10)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

            request = {"id": "gw-1", "inputs": [tensor]}
            async with http.post("/v1/models/mlp/requests", json=request) as reply:
                assert reply.status == 202, await reply.text()
            async with http.get("/v1/requests/gw-1?wait=30") as reply:
                assert reply.status == 200, await reply.text()
            async with http.post("/v1/models/mlp/requests", json=request) as reply:
                assert reply.status == 409  # the id is taken
            async with http.delete("/v1/requests/gw-1") as reply:
                assert reply.status == 409  # finished: nothing left to cancel
            async with http.delete("/v1/requests/never-submitted") as reply:
                assert reply.status == 404
    finally:
        await running.stop()


def test_batch_jobs_refuse_a_cluster_with_a_clear_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    np.save(tmp_path / "x.npy", np.ones((10, 256), np.float32))
    done = subprocess.run(
        [sys.executable, "-m", "common.cli", "batch", "submit",
         "--redis", "redis+cluster://127.0.0.1:1,127.0.0.1:2", "--model", "mlp",
         "--input", str(tmp_path / "x.npy"), "--output-dir", str(tmp_path / "out"),
         "--shard-rows", "5"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "RQ needs a single Redis node" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


async def test_failover_of_the_queue_master(
    tmp_path: Path, models_dir: Path, start_pool: Callable[..., PoolHandle]
) -> None:
    """Kill the master holding mlp's stream mid-run; its replica takes over.
    Replication is asynchronous, so a request can be lost with its master:
    then its wait ends with RequestTimeout. Every other request gets its
    result, the worker survives, and the cluster serves new requests."""
    with local_cluster(tmp_path / "ha", replicas=1) as cluster:
        config = host_config(tmp_path / "w", models_dir, batch=64, worker="")
        pool = start_pool(config, cluster.url, devices="cpu", workers=1)
        keys = Keys.of(RedisSettings(url=cluster.url))
        victim = cluster.master_of(keys.queue("mlp"))
        x = np.ones((1, 256), np.float32)
        outcomes: Counter[str] = Counter()
        async with AsyncClient(cluster.url) as client:
            ids: list[str] = []
            for chunk in range(12):
                if chunk == 4:
                    cluster.nodes[victim].process.kill()  # type: ignore[union-attr]
                while True:  # during the failover a submit fails at once: try again
                    try:
                        ids += await client.submit_many(
                            [Submission("mlp", {"x": x}) for _ in range(250)]
                        )
                        break
                    except RedisUnavailable:
                        outcomes["submit retried"] += 1
                        await asyncio.sleep(0.2)  # pacing retries, not synchronisation

            async def outcome(request_id: str) -> str:
                try:
                    return (await client.wait(request_id, timeout=30)).status
                except RequestTimeout:
                    return "timeout"

            outcomes.update(await asyncio.gather(*(outcome(i) for i in ids)))
            after = await client.infer("mlp", {"x": x}, timeout=60)
        print(f"failover: {dict(outcomes)}")
        assert outcomes["ok"] + outcomes["timeout"] == len(ids)
        assert outcomes["ok"] >= len(ids) * 0.5
        assert cluster.master_of(keys.queue("mlp")) != victim  # the replica took over
        assert after["y"].shape == (1, 10)
        assert pool.process.poll() is None
        pool.stop()
