"""A model must return what it declares, and one forward must stay under
its model's ``max_batch_bytes``: real TorchScript models that break their
declared outputs, served by a real pool (and refused at load when the
warm-up already shows it), and requests over the byte limit refused by the
client, by the gateway, and by a worker reading one put straight on the
stream. No ``ok`` result ever carries wrong data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import redis
import torch
from torch import Tensor, nn

from common.envelope import Request, pack_request, unpack_result
from common.errors import InferenceError, InvalidInput
from common.keys import Keys
from common.settings import load_settings
from producer import AsyncClient, Submission
from producer.gateway import start
from tests.conftest import PoolHandle, wait_until, write_config

KEYS = Keys()
INBOX = KEYS.inbox("contract-test")
LIMIT = 4096  # max_batch_bytes of "limited": 1024 float32 of padded input per forward


class FirstRow(nn.Module):
    """Right for one row, wrong for every batch of more."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:1]


class AtMostFour(nn.Module):
    """Its variable output axis keeps at most 4 positions."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, :4] * 2


class Twice(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * 2


class Wide(nn.Module):
    """8 columns where the config declares 4."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, x], dim=1)


def model_toml(
    directory: Path, name: str, module: nn.Module, shape: str, settings: str = ""
) -> str:
    path = directory / f"{name}.pt"
    torch.jit.script(module).save(str(path))  # type: ignore[no-untyped-call]
    return (
        f'[[models]]\nname = "{name}"\npath = "{path}"\n{settings}'
        f'  [[models.inputs]]\n  name = "x"\n  dtype = "float32"\n  shape = {shape}\n'
        f'  [[models.outputs]]\n  name = "y"\n  dtype = "float32"\n  shape = {shape}\n'
    )


@pytest.fixture
def config(tmp_path: Path, models_dir: Path) -> Path:
    extra = (
        model_toml(tmp_path, "first", FirstRow(), "[4]", "max_batch_size = 4\n")
        + model_toml(tmp_path, "short", AtMostFour(), "[-1]", "max_batch_size = 8\n")
        + model_toml(
            tmp_path, "limited", Twice(), "[-1]",
            f"max_batch_size = 8\nmax_batch_bytes = {LIMIT}\nmax_delay_ms = 50\n",
        )
    )  # fmt: skip
    return write_config(tmp_path / "tensorq.toml", models_dir, extra=extra)


async def post(url: str, model: str, x: np.ndarray[Any, Any]) -> tuple[int, Any]:
    body = {
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    url = f"{url}/v2/models/{model}/infer"
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as response:
        return response.status, await response.json()


async def test_outputs_breaking_their_declaration_never_come_back_ok(
    config: Path, redis_url: str, start_pool: Callable[..., PoolHandle]
) -> None:
    start_pool(config, redis_url, devices="cpu", workers=1)
    rows = [np.full((1, 4), i, np.float32) for i in range(8)]
    async with AsyncClient(redis_url) as client:
        # the reported case: 8 one-row requests to a model returning x[:1]
        ids = await client.submit_many([Submission("first", {"x": x}) for x in rows])
        for request_id, x in zip(ids, rows, strict=True):
            result = await client.wait(request_id, timeout=60)
            assert result.status == "ok", result.error_message
            np.testing.assert_array_equal(result.outputs["y"], x)  # its own row, alone
        with pytest.raises(InferenceError) as info:
            await client.infer("first", {"x": np.ones((2, 4), np.float32)}, timeout=60)
        assert info.value.code == "model_error"
        assert info.value.message == (
            "OutputMismatch: model 'first' output 'y': got shape [1, 4], "
            "declared [n, 4] with n = 2 (the batch's rows)"
        )

        # a variable output axis shorter than a request's length
        lengths = [3, 6, 2, 4, 9]
        seqs = [np.arange(n, dtype=np.float32)[None] + 1 for n in lengths]
        ids = await client.submit_many([Submission("short", {"x": x}) for x in seqs])
        for request_id, x in zip(ids, seqs, strict=True):
            result = await client.wait(request_id, timeout=60)
            n = x.shape[1]
            if n <= 4:
                assert result.status == "ok", result.error_message
                np.testing.assert_array_equal(result.outputs["y"], x * 2)
            else:
                assert (result.status, result.error_code) == ("error", "model_error")
                assert not result.outputs
                assert result.error_message == (
                    f"OutputMismatch: model 'short' output 'y': got shape [1, 4], declared "
                    f"[n, -1] with n = 1 (the batch's rows), each -1 at least {n} "
                    "(the longest request)"
                )

    # over HTTP: a 500 with the worker's message, never a 200 with wrong rows
    settings = load_settings(config, env={}, overrides={"redis.url": redis_url, "gateway.port": 0})
    gateway = await start(settings)
    try:
        status, body = await post(gateway.url, "first", np.ones((2, 4), np.float32))
        assert status == 500
        assert "output 'y': got shape [1, 4], declared [n, 4] with n = 2" in body["error"]
        status, body = await post(gateway.url, "first", np.full((1, 4), 7, np.float32))
        assert status == 200
        assert body["outputs"][0]["shape"] == [1, 4] and body["outputs"][0]["data"] == [7] * 4
    finally:
        await gateway.stop()


def test_a_model_breaking_its_outputs_at_warm_up_is_not_served(
    tmp_path: Path, models_dir: Path, redis_url: str, start_pool: Callable[..., PoolHandle]
) -> None:
    extra = model_toml(tmp_path, "wide", Wide(), "[4]")
    config = write_config(tmp_path / "tensorq.toml", models_dir, extra=extra)
    pool = start_pool(config, redis_url, devices="cpu", workers=1, wait=False)
    assert pool.process.wait(timeout=120) == 3  # EXIT_FATAL: a config error, not retried
    pool.stopped = True
    log = pool.log()
    assert "model 'wide' output 'y': got shape [1, 8], declared [n, 4]" in log, log
    assert "fix the model's forward or the output's shape in its [[models.outputs]]" in log, log


async def test_a_request_over_max_batch_bytes_is_refused_everywhere(
    config: Path, redis_url: str, sync_redis: redis.Redis, start_pool: Callable[..., PoolHandle]
) -> None:
    start_pool(config, redis_url, devices="cpu", workers=1)
    queue = KEYS.queue("limited")
    big = np.ones((1, 2000), np.float32)  # 8000 bytes alone
    message = (
        f"inputs take 8000 bytes, over model 'limited' max_batch_bytes {LIMIT} (the most one "
        "forward's inputs may take): send fewer rows or shorter inputs"
    )
    async with AsyncClient(redis_url) as client:
        with pytest.raises(InvalidInput) as info:
            await client.submit("limited", {"x": big}, request_id="too-big")
        assert (info.value.code, info.value.request_id) == ("invalid_input", "too-big")
        assert info.value.message == message
        assert sync_redis.xlen(queue) == 0  # nothing enqueued

        # requests of 2,000 bytes each: at most two share a forward
        xs = [np.full((1, 500), i, np.float32) for i in range(12)]
        ids = await client.submit_many([Submission("limited", {"x": x}) for x in xs])
        for request_id, x in zip(ids, xs, strict=True):
            result = await client.wait(request_id, timeout=60)
            assert result.status == "ok", result.error_message
            assert result.batch_size <= 2
            np.testing.assert_array_equal(result.outputs["y"], x * 2)

    settings = load_settings(config, env={}, overrides={"redis.url": redis_url, "gateway.port": 0})
    gateway = await start(settings)
    try:
        status, body = await post(gateway.url, "limited", big)
    finally:
        await gateway.stop()
    assert status == 400
    assert f"over model 'limited' max_batch_bytes {LIMIT}" in body["error"]
    assert sync_redis.xlen(queue) == 0

    # put straight on the stream, past every client: the worker answers invalid_input
    request = Request("raw-big", "limited", {"x": big}, None, INBOX)
    sync_redis.xadd(queue, {"req": pack_request(request)})
    reply: Any = sync_redis.blmpop(60, 1, INBOX, direction="RIGHT", count=10)
    [result] = [unpack_result(blob) for blob in reply[1]]
    assert (result.id, result.status, result.error_code) == ("raw-big", "error", "invalid_input")
    assert result.error_message == message
    assert not result.outputs
    wait_until(lambda: sync_redis.xlen(queue) == 0, 30, "the refused entry acked and deleted")
