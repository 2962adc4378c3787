"""The Open Inference Protocol endpoints against a real pool: health and
metadata, and inference round trips for every datatype (JSON tensors, the
binary tensor data extension, and both mixed) equal to the model called
directly in this process."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import numpy as np
import pytest
import redis.asyncio as aioredis
import torch

from common.spec import ModelSpec
from producer.gateway.oip import HEADER_LENGTH, WIRE_TO_OIP
from tests.gateway_stack import DTYPES, KEYS, ROW_SHAPE, TORCH_DTYPES, GatewayStack, idle_model

pytest_plugins = ["tests.gateway_fixtures"]

Http = aiohttp.ClientSession


async def get_json(http: Http, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def post(
    http: Http, url: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], bytes]:
    """POST; returns status, the JSON document and the binary part (if any)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url, data=data, headers=headers) as response:
        raw = await response.read()
        length = response.headers.get(HEADER_LENGTH)
        if length is None:
            assert response.content_type == "application/json"
            return response.status, json.loads(raw), b""
        assert response.content_type == "application/octet-stream"
        return response.status, json.loads(raw[: int(length)]), raw[int(length) :]


def json_tensor(name: str, x: torch.Tensor) -> dict[str, Any]:
    return {
        "name": name,
        "shape": list(x.shape),
        "datatype": WIRE_TO_OIP[str(x.dtype).removeprefix("torch.")],
        "data": x.flatten().tolist(),
    }


def raw_bytes(x: torch.Tensor) -> bytes:
    if x.dtype == torch.bfloat16:
        x = x.view(torch.int16)
    return bytes(x.contiguous().numpy().tobytes())


def from_bytes(data: bytes, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return (
            torch.from_numpy(np.frombuffer(data, "<i2").copy()).view(torch.bfloat16).reshape(shape)
        )
    storage = torch.empty(0, dtype=dtype).numpy().dtype
    return torch.from_numpy(np.frombuffer(data, storage).copy()).reshape(shape)


def sample(dtype: str, rng: np.random.Generator) -> torch.Tensor:
    """Two rows of the dtype models' [2, 3] input, over the dtype's range."""
    shape = (2, *ROW_SHAPE)
    if dtype == "bool":
        return torch.from_numpy(rng.integers(0, 2, shape).astype(bool))
    if dtype.startswith(("float", "bfloat")):
        values = torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 100)
        return values.to(TORCH_DTYPES[dtype])
    info = np.iinfo(dtype)
    high = min(int(info.max), 2**62)  # room for the model's +1
    values = rng.integers(max(int(info.min), -(2**62)), high, shape, dtype=np.int64)
    return torch.from_numpy(values.astype(dtype))


# --------------------------------------------------------------------------- health, metadata


async def test_health_and_server_metadata(gateway: str, http: Http) -> None:
    assert await get_json(http, f"{gateway}/v2/health/live") == (200, {"live": True})
    assert await get_json(http, f"{gateway}/v2/health/ready") == (200, {"ready": True})
    status, meta = await get_json(http, f"{gateway}/v2")
    assert status == 200
    assert meta["name"] == "tensorq" and meta["version"]
    assert "binary_tensor_data" in meta["extensions"]


async def test_model_metadata_has_batch_and_variable_axes(
    gateway: str, http: Http, aredis: aioredis.Redis
) -> None:
    version = ModelSpec.from_json(await aredis.hget(KEYS.models, "seq")).version
    status, meta = await get_json(http, f"{gateway}/v2/models/seq")
    assert status == 200
    assert meta == {
        "name": "seq",
        "versions": [version],
        "platform": "pytorch_libtorch",
        "inputs": [{"name": "tokens", "datatype": "INT64", "shape": [-1, -1]}],
        "outputs": [
            {"name": "pooled", "datatype": "FP32", "shape": [-1, 16]},
            {"name": "scores", "datatype": "FP32", "shape": [-1, -1]},
        ],
    }
    assert await get_json(http, f"{gateway}/v2/models/seq/versions/{version}") == (200, meta)
    status, bf16 = await get_json(http, f"{gateway}/v2/models/dt_bfloat16")
    assert bf16["inputs"] == [{"name": "x", "datatype": "BF16", "shape": [-1, 2, 3]}]
    status, error = await get_json(http, f"{gateway}/v2/models/seq/versions/nope")
    assert status == 404 and "no version 'nope'" in error["error"]


async def test_model_readiness(gateway: str, http: Http, aredis: aioredis.Redis) -> None:
    assert await get_json(http, f"{gateway}/v2/models/mlp/ready") == (
        200,
        {"name": "mlp", "ready": True},
    )
    status, error = await get_json(http, f"{gateway}/v2/models/nope/ready")
    assert status == 404 and "nope" in error["error"]
    await idle_model(aredis, "unserved")  # published, but no live worker serves it
    status, doc = await get_json(http, f"{gateway}/v2/models/unserved/ready")
    assert status == 503  # not ready, as load balancers expect
    assert doc["ready"] is False and "no live worker" in doc["error"]


# --------------------------------------------------------------------------- inference


@pytest.mark.parametrize("mode", ["json", "binary", "binary_in_json_out"])
@pytest.mark.parametrize("dtype", DTYPES)
async def test_every_datatype_round_trips_equal_to_the_model(
    gateway: str, http: Http, gw_stack: GatewayStack, dtype: str, mode: str
) -> None:
    x = sample(dtype, np.random.default_rng(DTYPES.index(dtype)))
    expected = gw_stack.direct(f"dt_{dtype}", x)
    assert not torch.equal(expected, x)  # the model changes every value
    url = f"{gateway}/v2/models/dt_{dtype}/infer"
    if mode == "json":
        status, doc, binary = await post(
            http, url, {"id": f"r-{dtype}", "inputs": [json_tensor("x", x)]}
        )
    else:
        data = raw_bytes(x)
        tensor = {**json_tensor("x", x), "parameters": {"binary_data_size": len(data)}}
        del tensor["data"]
        header: dict[str, Any] = {"id": f"b-{dtype}", "inputs": [tensor]}
        if mode == "binary":
            header["parameters"] = {"binary_data_output": True}
        head = json.dumps(header).encode()
        status, doc, binary = await post(http, url, head + data, {HEADER_LENGTH: str(len(head))})
    assert status == 200, doc
    assert doc["model_name"] == f"dt_{dtype}"
    assert doc["id"] == (f"r-{dtype}" if mode == "json" else f"b-{dtype}")
    [out] = doc["outputs"]
    assert out["name"] == "y"
    assert out["datatype"] == WIRE_TO_OIP[dtype]
    assert out["shape"] == [2, *ROW_SHAPE]
    if mode == "binary":
        assert "data" not in out
        assert out["parameters"]["binary_data_size"] == len(binary) == len(raw_bytes(expected))
        got = from_bytes(binary, TORCH_DTYPES[dtype], out["shape"])
    else:
        assert binary == b""
        got = torch.tensor(out["data"], dtype=TORCH_DTYPES[dtype]).reshape(out["shape"])
    assert torch.equal(got, expected)  # bit for bit


async def test_example_models_answer_what_the_model_computes(
    gateway: str, http: Http, gw_stack: GatewayStack
) -> None:
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.standard_normal((3, 256)).astype(np.float32))
    status, doc, _ = await post(
        http, f"{gateway}/v2/models/mlp/infer", {"inputs": [json_tensor("x", x)]}
    )
    assert status == 200
    assert doc["id"] and doc["model_version"]  # a generated id is echoed too
    [y] = doc["outputs"]
    assert y["shape"] == [3, 10]
    expected = gw_stack.direct("mlp", x).numpy()
    np.testing.assert_allclose(np.float32(y["data"]).reshape(3, 10), expected, rtol=1e-4, atol=1e-5)

    image = torch.from_numpy(rng.standard_normal((2, 3, 32, 32)).astype(np.float32))
    status, doc, _ = await post(
        http, f"{gateway}/v2/models/cnn/infer", {"inputs": [json_tensor("x", image)]}
    )
    assert status == 200
    logits = np.float32(doc["outputs"][0]["data"]).reshape(2, 10)
    np.testing.assert_allclose(logits, gw_stack.direct("cnn", image).numpy(), rtol=1e-4, atol=1e-5)


async def test_requested_outputs_binary_choices_and_nested_data(
    gateway: str, http: Http, gw_stack: GatewayStack
) -> None:
    tokens = torch.tensor([[5, 17, 230, 9, 1]], dtype=torch.int64)
    pooled, scores = gw_stack.direct("seq", tokens)
    url = f"{gateway}/v2/models/seq/infer"
    nested = {**json_tensor("tokens", tokens), "data": tokens.tolist()}  # [[...]], not flat
    only_scores = {"inputs": [nested], "outputs": [{"name": "scores"}]}
    status, doc, _ = await post(http, url, only_scores)
    assert status == 200
    assert [o["name"] for o in doc["outputs"]] == ["scores"]
    np.testing.assert_allclose(doc["outputs"][0]["data"], scores.flatten().numpy(), atol=1e-5)

    # binary_data_output for all, overridden per output: pooled as JSON, scores binary
    mixed = {
        "inputs": [nested],
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "scores"}, {"name": "pooled", "parameters": {"binary_data": False}}],
    }
    status, doc, binary = await post(http, url, mixed)
    assert status == 200
    first, second = doc["outputs"]
    assert (first["name"], second["name"]) == ("scores", "pooled")
    assert first["parameters"]["binary_data_size"] == len(binary) == 5 * 4
    np.testing.assert_allclose(np.frombuffer(binary, "<f4"), scores.flatten().numpy(), atol=1e-5)
    np.testing.assert_allclose(second["data"], pooled.flatten().numpy(), atol=1e-5)
