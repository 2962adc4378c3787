"""Async submission and polling: 202 then 200, long-polls woken by this
gateway's own requests and by the poll loop (a request submitted through
another gateway), the msgpack wire format both ways, client-given ids,
cancellation, and 404 once a result has expired."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgpack
import numpy as np
import redis.asyncio as aioredis
import torch

from common.codec import encode_tensor
from common.envelope import Result, unpack_result
from producer.gateway import RunningGateway
from producer.gateway.oip import HEADER_LENGTH
from producer.gateway.state import GATEWAY
from tests.gateway_stack import (
    KEYS,
    RESULT_TTL_S,
    GatewayStack,
    answer_next,
    doubled,
    idle_model,
    until,
)

pytest_plugins = ["tests.gateway_fixtures"]

Http = aiohttp.ClientSession
MakeGateway = Callable[..., Awaitable[RunningGateway]]
MSGPACK = "application/msgpack"
FOUR = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


async def submit(http: Http, base: str, model: str, body: Any = FOUR) -> str:
    async with http.post(f"{base}/v1/models/{model}/requests", json=body) as response:
        assert response.status == 202
        doc = await response.json()
        assert doc == {"id": doc["id"], "model": model, "status": "pending"}
        assert response.headers["Location"] == f"/v1/requests/{doc['id']}"
        return str(response.headers["Location"])


async def poll(http: Http, url: str, **headers: str) -> tuple[int, Any]:
    async with http.get(url, headers=headers) as response:
        if response.content_type == MSGPACK:
            return response.status, await response.read()
        return response.status, await response.json()


async def test_pending_is_202_then_the_result_is_200(
    gateway: str, http: Http, aredis: aioredis.Redis
) -> None:
    await idle_model(aredis, "held")
    location = await submit(http, gateway, "held")
    request_id = location.rsplit("/", 1)[1]
    assert await poll(http, gateway + location) == (202, {"id": request_id, "status": "pending"})
    assert await poll(http, f"{gateway}{location}?wait=0.05") == (
        202,
        {"id": request_id, "status": "pending"},
    )
    await answer_next(aredis, "held", doubled)
    status, doc = await poll(http, gateway + location)
    assert status == 200
    assert doc["id"] == request_id and doc["model_name"] == "held"
    assert doc["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1, 4], "data": [2, 4, 6, 8]}
    ]


async def test_long_poll_is_woken_by_the_result(
    make_gateway: MakeGateway, http: Http, aredis: aioredis.Redis
) -> None:
    """Through the gateway that submitted (its inbox) and through another
    gateway (its poll loop): neither holds a Redis connection per waiter."""
    first, second = await make_gateway(), await make_gateway()
    await idle_model(aredis, "slow")
    for submitter, poller in ((first, first), (first, second)):
        location = await submit(http, submitter.url, "slow")
        waiting = asyncio.create_task(poll(http, f"{poller.url}{location}?wait=30"))
        watcher = poller.runner.app[GATEWAY].watcher
        await until(lambda w=watcher: w.watching == 1, what="the long-poll to park")  # type: ignore[misc]
        assert not waiting.done()
        await answer_next(aredis, "slow", doubled)
        status, doc = await waiting
        assert status == 200
        assert doc["outputs"][0]["data"] == [2, 4, 6, 8]


async def test_shutdown_answers_long_polls_at_once(
    make_gateway: MakeGateway, http: Http, aredis: aioredis.Redis
) -> None:
    running = await make_gateway()
    await idle_model(aredis, "parked")
    location = await submit(http, running.url, "parked")
    waiting = asyncio.create_task(poll(http, f"{running.url}{location}?wait=60"))
    watcher = running.runner.app[GATEWAY].watcher
    await until(lambda: watcher.watching == 1, what="the long-poll to park")
    await running.stop()  # returns without waiting out the 60 s long-poll
    status, doc = await waiting
    assert status == 202 and doc["status"] == "pending"


async def test_msgpack_in_and_out_with_a_real_worker(
    gateway: str, http: Http, gw_stack: GatewayStack
) -> None:
    x = np.random.default_rng(3).standard_normal((2, 256)).astype(np.float32)
    body = msgpack.packb({"inputs": {"x": encode_tensor(x)}}, use_bin_type=True)
    headers = {"Content-Type": MSGPACK, "Accept": MSGPACK}
    async with http.post(f"{gateway}/v1/models/mlp/requests", data=body, headers=headers) as r:
        assert r.status == 202 and r.content_type == MSGPACK
        accepted = msgpack.unpackb(await r.read())
        location = r.headers["Location"]
    assert accepted["status"] == "pending" and location.endswith(accepted["id"])
    status, raw = await poll(http, f"{gateway}{location}?wait=30", Accept=MSGPACK)
    assert status == 200
    result = unpack_result(raw)  # the stored result envelope, byte for byte
    assert result.id == accepted["id"] and result.status == "ok"
    expected = gw_stack.direct("mlp", torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(result.outputs["y"], expected, rtol=1e-4, atol=1e-5)
    status, doc = await poll(http, gateway + location)  # the same result as OIP JSON
    assert status == 200
    np.testing.assert_allclose(np.float32(doc["outputs"][0]["data"]).reshape(2, 10), expected,
                               rtol=1e-4, atol=1e-5)  # fmt: skip


async def test_requested_binary_outputs_are_kept_for_the_poll(gateway: str, http: Http) -> None:
    body = {**FOUR, "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}
    location = await submit(http, gateway, "boom", body)
    async with http.get(f"{gateway}{location}?wait=30") as response:
        assert response.status == 200
        assert response.content_type == "application/octet-stream"
        raw = await response.read()
    length = int(response.headers[HEADER_LENGTH])
    header = json.loads(raw[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 16}
    assert np.frombuffer(raw[length:], "<f4").tolist() == [2, 4, 6, 8]


async def test_a_client_given_id_is_used_and_cannot_be_reused(
    gateway: str, http: Http, aredis: aioredis.Redis
) -> None:
    location = await submit(http, gateway, "boom", {**FOUR, "id": "mine-1"})
    assert location == "/v1/requests/mine-1"
    assert (await poll(http, f"{gateway}{location}?wait=30"))[0] == 200
    row = {"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": [0.0] * 256}]}
    before = [await aredis.xlen(KEYS.queue(m)) for m in ("boom", "mlp")]
    for model, body in (("boom", FOUR), ("mlp", row)):
        async with http.post(
            f"{gateway}/v1/models/{model}/requests", json={**body, "id": "mine-1"}
        ) as response:
            assert response.status == 409
            assert "already in use" in (await response.json())["error"]
    assert [await aredis.xlen(KEYS.queue(m)) for m in ("boom", "mlp")] == before


async def test_cancel(gateway: str, http: Http, aredis: aioredis.Redis) -> None:
    await idle_model(aredis, "cancellable")
    location = await submit(http, gateway, "cancellable")
    request_id = location.rsplit("/", 1)[1]
    async with http.delete(gateway + location) as response:
        assert response.status == 202
        assert await response.json() == {"id": request_id, "status": "cancelling"}
    assert await aredis.exists(KEYS.cancelled(request_id))  # what workers check
    assert (await poll(http, gateway + location))[0] == 202  # until a worker answers it
    await answer_next(
        aredis,
        "cancellable",
        lambda r: Result.failure(r.id, "cancelled", "cancelled", "request cancelled"),
    )
    status, doc = await poll(http, gateway + location)
    assert status == 410 and "request cancelled" in doc["error"]
    async with http.delete(gateway + location) as response:
        assert response.status == 409  # finished: nothing left to cancel
    async with http.delete(f"{gateway}/v1/requests/never-submitted") as response:
        assert response.status == 404


async def test_results_expire_to_404(gateway: str, http: Http) -> None:
    location = await submit(http, gateway, "boom")
    assert (await poll(http, f"{gateway}{location}?wait=30"))[0] == 200

    async def gone() -> bool:
        return (await poll(http, gateway + location))[0] == 404

    await until(gone, timeout=RESULT_TTL_S * 5, what="the result to expire")
    _, doc = await poll(http, gateway + location)
    assert "unknown, or its result expired" in doc["error"]


async def test_unknown_ids_and_bad_waits(gateway: str, http: Http) -> None:
    assert (await poll(http, f"{gateway}/v1/requests/nothing-here"))[0] == 404
    for wait in ("-1", "abc", "nan", "inf"):
        status, doc = await poll(http, f"{gateway}/v1/requests/nothing-here?wait={wait}")
        assert status == 400 and "'wait'" in doc["error"]
