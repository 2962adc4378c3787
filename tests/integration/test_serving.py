"""End to end on a real redis-server with a real two-process worker pool:
results equal the model called directly, batches form, padding is exact,
bad submissions fail at once, SIGTERM drains without losing a request."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import redis
import torch

from common.errors import InvalidInput, ProtocolError, RedisUnavailable, UnknownModel
from common.keys import Keys
from common.settings import load_settings
from producer import AsyncClient, Submission
from tests.conftest import PoolHandle, async_wait_until, wait_until, write_config

KEYS = Keys()


@pytest.fixture
def pool(
    tmp_path: Path, models_dir: Path, redis_url: str, start_pool: Callable[..., PoolHandle]
) -> PoolHandle:
    return start_pool(write_config(tmp_path / "tensorq.toml", models_dir), redis_url)


def direct(models_dir: Path, name: str, *inputs: np.ndarray) -> Any:
    module = torch.jit.load(str(models_dir / f"{name}.pt"))
    with torch.inference_mode():
        return module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs))


async def test_mixed_requests_through_two_workers_equal_direct_calls(
    pool: PoolHandle, models_dir: Path
) -> None:
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((1 + i % 4, 256)).astype(np.float32) for i in range(1200)]
    async with AsyncClient(pool.redis_url) as client:
        ids: list[str] = []
        for start in range(0, len(inputs), 300):  # bursts, so the queue builds up
            chunk = inputs[start : start + 300]
            ids += await client.submit_many([Submission("mlp", {"x": x}) for x in chunk])
        results = [await client.wait(i, timeout=60) for i in ids]
    assert [r.status for r in results] == ["ok"] * len(inputs)
    for x, result in zip(inputs, results, strict=True):
        expected = direct(models_dir, "mlp", x).numpy()
        assert result.outputs["y"].shape == (x.shape[0], 10)
        np.testing.assert_allclose(result.outputs["y"], expected, rtol=1e-4, atol=1e-5)
    assert max(r.batch_size for r in results) > 4  # rows of more than one request
    assert len({r.worker for r in results}) == 2
    assert all(r.infer_ms > 0 for r in results)


async def test_padded_variable_length_batches_equal_each_request_alone(
    pool: PoolHandle, models_dir: Path
) -> None:
    rng = np.random.default_rng(2)
    requests = [
        rng.integers(1, 1000, (1 + i % 3, int(rng.integers(1, 40)))).astype(np.int64)
        for i in range(200)
    ]
    async with AsyncClient(pool.redis_url) as client:
        ids = await client.submit_many([Submission("seq", {"tokens": t}) for t in requests])
        results = [await client.wait(i, timeout=60) for i in ids]
    assert max(r.batch_size for r in results) > 3  # padding really happened across requests
    for tokens, result in zip(requests, results, strict=True):
        pooled, scores = direct(models_dir, "seq", tokens)
        assert result.status == "ok"
        assert result.outputs["scores"].shape == tokens.shape  # cut back to its own length
        np.testing.assert_allclose(result.outputs["pooled"], pooled.numpy(), atol=1e-5)
        np.testing.assert_allclose(result.outputs["scores"], scores.numpy(), atol=1e-5)


async def test_cnn_and_sync_client_and_lone_request_runs_alone(
    pool: PoolHandle, models_dir: Path
) -> None:
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    async with AsyncClient(pool.redis_url) as client:
        request_id = await client.submit("cnn", {"x": x})
        result = await client.wait(request_id, timeout=60)
    # idle pool, one request: it ran at once in a batch of its own rows
    assert result.batch_size == 2
    np.testing.assert_allclose(
        result.outputs["logits"], direct(models_dir, "cnn", x).numpy(), rtol=1e-4, atol=1e-5
    )


async def test_a_reused_request_id_gets_the_new_answer(pool: PoolHandle, models_dir: Path) -> None:
    """Ids are the producer's: re-running rows under their own ids within the
    result TTL must answer the new inputs, at once, not the old result."""
    first, second = np.zeros((1, 256), np.float32), np.ones((1, 256), np.float32)
    async with AsyncClient(pool.redis_url) as client:
        await client.wait(await client.submit("mlp", {"x": first}, request_id="row-7"), 30)
        again = await client.wait(await client.submit("mlp", {"x": second}, request_id="row-7"), 30)
    np.testing.assert_allclose(
        again.outputs["y"], direct(models_dir, "mlp", second).numpy(), atol=1e-5
    )


async def test_a_bad_submission_fails_alone_and_the_client_reconnects(pool: PoolHandle) -> None:
    """A submission that cannot be encoded (a timeout past any sane deadline)
    fails with InvalidInput on its own, not the submitters sharing its round
    trip; and a closed client connects again with its inbox reader."""
    x = np.ones((1, 256), np.float32)
    client = AsyncClient(pool.redis_url)
    async with client:
        outcomes = await asyncio.gather(
            client.submit("mlp", {"x": x}),
            client.submit("mlp", {"x": x}, timeout=1e17),
            client.submit("mlp", {"x": x}, timeout=float("nan")),
            client.submit("mlp", {"x": x}),
            return_exceptions=True,
        )
        assert [type(o).__name__ for o in outcomes] == [
            "str",
            "InvalidInput",
            "InvalidInput",
            "str",
        ]
        for request_id in (outcomes[0], outcomes[3]):
            assert (await client.wait(str(request_id), timeout=30)).status == "ok"
    async with client:  # again: a result must come by the inbox, not by polling
        request_id = await client.submit("mlp", {"x": x})
        result = await asyncio.wait_for(client.wait(request_id, timeout=None), 30)
    assert result.status == "ok"


async def test_results_nobody_waits_for_do_not_pile_up_in_the_client(
    pool: PoolHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Submit and forget: delivered results not claimed by a wait() are let go
    after UNCLAIMED_S (0 here); a late wait() still gets them, from Redis."""
    import producer.client.inbox

    monkeypatch.setattr(producer.client.inbox, "UNCLAIMED_S", 0.0)
    x = np.ones((1, 256), np.float32)
    async with AsyncClient(pool.redis_url) as client:
        ids = [await client.submit("mlp", {"x": x}) for _ in range(3)]
        await async_wait_until(lambda: not client._inbox.waiters, 30, "every result let go")
        late = await client.wait(ids[0], timeout=10)
    assert late.status == "ok" and late.id == ids[0]


def test_sync_client_infer_and_fetch_by_id(pool: PoolHandle, models_dir: Path) -> None:
    from producer import Client

    x = torch.randn(1, 256)  # torch tensors are accepted as inputs
    with Client(pool.redis_url) as client:
        out = client.infer("mlp", {"x": x}, timeout=30)
        request_id = client.submit("mlp", {"x": x.numpy()})
        client.wait(request_id, timeout=30)
    np.testing.assert_allclose(out["y"], direct(models_dir, "mlp", x.numpy()).numpy(), atol=1e-5)
    with Client(pool.redis_url) as other:  # any client can read a result by id
        again = other.result(request_id, timeout=5)
    np.testing.assert_allclose(again["y"], out["y"], atol=1e-5)


async def test_workers_report_their_pinned_device(pool: PoolHandle) -> None:
    records = pool.live_workers()
    assert sorted(str(r["device"]) for r in records) == ["cpu:0", "cpu:1"]
    assert all(r["cuda_visible_devices"] == "" and r["torch_device"] == "cpu" for r in records)
    assert all(r["threads"] == 1 for r in records)  # two slots share two cores


async def test_bad_submissions_fail_at_once_and_enqueue_nothing(
    pool: PoolHandle, sync_redis: redis.Redis
) -> None:
    async with AsyncClient(pool.redis_url) as client:
        with pytest.raises(UnknownModel, match="nope"):
            await client.submit("nope", {"x": np.zeros((1, 256), np.float32)})
        with pytest.raises(InvalidInput, match="dtype float64"):
            await client.submit("mlp", {"x": np.zeros((1, 256), np.float64)})
        with pytest.raises(InvalidInput, match="shape"):
            await client.submit("mlp", {"x": np.zeros((1, 255), np.float32)})
        with pytest.raises(InvalidInput, match="missing input"):
            await client.submit("mlp", {})
        with pytest.raises(InvalidInput, match="max_batch_size"):
            await client.submit("mlp", {"x": np.zeros((129, 256), np.float32)})
        with pytest.raises(ProtocolError, match="not a wire dtype"):
            await client.submit("mlp", {"x": np.zeros((1, 256), np.uint16)})
        err = None
        try:
            await client.submit("mlp", {"x": np.zeros((1, 3), np.float32)}, request_id="r-1")
        except InvalidInput as exc:
            err = exc
        assert err is not None and err.request_id == "r-1"
    assert sync_redis.xlen(KEYS.queue("mlp")) == 0
    assert sync_redis.exists(KEYS.queue("nope")) == 0


async def test_unreachable_redis_is_a_clear_error_without_the_password() -> None:
    client = AsyncClient("redis://user:s3cret@127.0.0.1:1/0")
    with pytest.raises(RedisUnavailable) as info:
        await client.connect()
    assert "127.0.0.1:1" in str(info.value)
    assert "s3cret" not in str(info.value)


async def test_sigterm_drains_and_loses_nothing(pool: PoolHandle, sync_redis: redis.Redis) -> None:
    x = np.ones((1, 256), np.float32)
    async with AsyncClient(pool.redis_url) as client:
        ids = await client.submit_many([Submission("mlp", {"x": x}) for _ in range(3000)])
        # stop once work is under way, not before
        wait_until(lambda: sync_redis.exists(KEYS.result(ids[0])), 60, "first result")
        pool.process.send_signal(signal.SIGTERM)
        assert pool.stop() == 0
    answered = {i for i in ids if sync_redis.exists(KEYS.result(i))}
    queued = set()
    for _, fields in sync_redis.xrange(KEYS.queue("mlp")):
        queued.add(msgpack.unpackb(fields[b"req"], raw=False)["id"])
    assert answered | queued == set(ids)  # every request answered or still queued
    assert not answered & queued  # and never both: acked entries are deleted
    assert answered  # the drain finished the in-flight batches
    assert "did not drain" not in pool.log()  # each worker exited on its own


async def test_adaptive_pool_answers_correctly(
    tmp_path: Path, models_dir: Path, redis_url: str, start_pool: Callable[..., PoolHandle]
) -> None:
    config = write_config(tmp_path / "t.toml", models_dir)
    text = config.read_text().replace('name = "mlp"', 'name = "mlp"\nbatch_policy = "adaptive"', 1)
    config.write_text(text)
    assert load_settings(config).model("mlp").batch_policy == "adaptive"
    pool = start_pool(config, redis_url, devices="cpu", workers=1)
    x = np.random.default_rng(0).standard_normal((300, 1, 256)).astype(np.float32)
    async with AsyncClient(pool.redis_url) as client:
        ids = await client.submit_many([Submission("mlp", {"x": row}) for row in x])
        results = [await client.wait(i, timeout=60) for i in ids]
        alone = await client.infer("mlp", {"x": x[0]}, timeout=30)
    assert {r.status for r in results} == {"ok"}
    np.testing.assert_allclose(results[0].outputs["y"], alone["y"], rtol=1e-4, atol=1e-5)
    assert max(r.batch_size for r in results) > 1
