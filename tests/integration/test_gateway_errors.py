"""Every refusal of the gateway: its status, a JSON body {"error": ...}, and
nothing enqueued (XLEN of the model's queue unchanged, no marker written);
then bearer-token auth on and off, and the /metrics exposition."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from common.envelope import Result
from producer.gateway import RunningGateway
from producer.gateway.oip import HEADER_LENGTH
from tests.gateway_stack import KEYS, answer_next, idle_model, stand_in_worker

pytest_plugins = ["tests.gateway_fixtures"]

Http = aiohttp.ClientSession
MakeGateway = Callable[..., Awaitable[RunningGateway]]

ROW = [0.5] * 256


def mlp_body(**changes: Any) -> dict[str, Any]:
    tensor = {"name": "x", "shape": [1, 256], "datatype": "FP32", "data": ROW, **changes}
    return {"inputs": [tensor]}


def raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


BINARY_HEAD = raw(
    {"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32",
                 "parameters": {"binary_data_size": 1024}}]}
)  # fmt: skip

ZERO_HEAD = raw(
    {"inputs": [{"name": "x", "shape": [2**62, 2**62, 0], "datatype": "FP32",
                 "parameters": {"binary_data_size": 0}}]}
)  # fmt: skip

# (case, model, body, extra headers, status, part of the error message)
BAD_REQUESTS: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("malformed JSON", "mlp", b'{"inputs": [', {}, 400, "malformed JSON"),
    ("not an object", "mlp", b"[1, 2]", {}, 400, "must be a JSON object"),
    ("no inputs", "mlp", raw({"id": "x"}), {}, 400, "'inputs' must be"),
    ("data shorter than shape", "mlp", raw(mlp_body(data=ROW[:-1])), {}, 400, "needs 256 values"),
    ("strings as FP32", "mlp", raw(mlp_body(data=["a"] * 256)), {}, 400, "must be numbers"),
    ("datatype BYTES", "mlp", raw(mlp_body(datatype="BYTES")), {}, 400, "not supported"),
    ("dtype the model does not take", "mlp", raw(mlp_body(datatype="FP64")), {}, 400,
     "dtype float64"),
    ("shape the model does not take", "mlp",
     raw(mlp_body(shape=[2, 128])), {}, 400, "shape [2, 128]"),
    ("negative dim", "mlp", raw(mlp_body(shape=[-1, 256])), {}, 400, "ints >= 0"),
    ("bad id", "mlp", raw({**mlp_body(), "id": "a/b"}), {}, 400, "'id' must be"),
    ("unknown output", "mlp", raw({**mlp_body(), "outputs": [{"name": "z"}]}), {}, 400,
     "no output(s) ['z']"),
    ("INT8 out of range", "dt_int8",
     raw({"inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "INT8",
                      "data": [300, 0, 0, 0, 0, 0]}]}), {}, 400, "outside the INT8 range"),
    ("header length past the body", "mlp", BINARY_HEAD, {HEADER_LENGTH: "99999"}, 400,
     "is not a length"),
    ("binary data too short", "mlp", BINARY_HEAD + b"\0" * 1000,
     {HEADER_LENGTH: str(len(BINARY_HEAD))}, 400, "binary data ends"),
    ("binary data too long", "mlp", BINARY_HEAD + b"\0" * 1030,
     {HEADER_LENGTH: str(len(BINARY_HEAD))}, 400, "add up to 1024"),
    ("zero-size shape too large for numpy", "mlp",
     raw(mlp_body(shape=[2**62, 2**62, 0], data=[])), {}, 400, "is too large"),
    ("zero-size binary shape too large for numpy", "mlp", ZERO_HEAD,
     {HEADER_LENGTH: str(len(ZERO_HEAD))}, 400, "is too large"),
    ("FP32 for a BF16 input", "dt_bfloat16",
     raw({"inputs": [{"name": "x", "shape": [1, 2, 3], "datatype": "FP32",
                      "data": [0.5] * 6}]}), {}, 400, "float32"),
    ("unknown model", "nope", raw(mlp_body()), {}, 404, "no worker serves model 'nope'"),
]  # fmt: skip


async def queue_lengths(redis: aioredis.Redis) -> dict[str, int]:
    return {m: await redis.xlen(KEYS.queue(m)) for m in ("mlp", "dt_int8", "dt_bfloat16", "nope")}


async def expect_error(response: aiohttp.ClientResponse, status: int, fragment: str) -> None:
    assert response.status == status
    assert response.content_type == "application/json"
    body = await response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str)
    assert fragment in body["error"], body


@pytest.mark.parametrize("path", ["/v2/models/{m}/infer", "/v1/models/{m}/requests"])
@pytest.mark.parametrize(
    ("case", "model", "body", "headers", "status", "fragment"),
    BAD_REQUESTS,
    ids=[row[0] for row in BAD_REQUESTS],
)
async def test_bad_requests_are_refused_and_enqueue_nothing(
    gateway: str, http: Http, aredis: aioredis.Redis, path: str,
    case: str, model: str, body: bytes, headers: dict[str, str], status: int, fragment: str,
) -> None:  # fmt: skip
    before = await queue_lengths(aredis)
    markers = await aredis.keys("tq:acc:*")
    url = gateway + path.format(m=model)
    async with http.post(url, data=body, headers=headers) as response:
        await expect_error(response, status, fragment)
    assert await queue_lengths(aredis) == before
    assert await aredis.keys("tq:acc:*") == markers


async def test_body_over_the_limit_is_413(
    make_gateway: MakeGateway, http: Http, aredis: aioredis.Redis
) -> None:
    url = (await make_gateway(max_body_bytes=16 * 1024)).url
    before = await aredis.xlen(KEYS.queue("mlp"))
    body = raw(mlp_body(data=[0.123456789] * 256, padding="x" * 20_000))
    for path in ("/v2/models/mlp/infer", "/v1/models/mlp/requests"):
        async with http.post(url + path, data=body) as response:
            await expect_error(response, 413, "")
    assert await aredis.xlen(KEYS.queue("mlp")) == before
    async with http.post(url + "/v2/models/mlp/infer", json=mlp_body()) as response:
        assert response.status == 200  # a body under the limit passes


async def test_queue_full_is_429_with_retry_after(
    gateway: str, http: Http, aredis: aioredis.Redis
) -> None:
    await idle_model(aredis, "tiny_queue", max_queue_len=2)
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    for _ in range(2):
        async with http.post(f"{gateway}/v1/models/tiny_queue/requests", json=body) as response:
            assert response.status == 202
    async with stand_in_worker(aredis, "tiny_queue"):  # a worker, busy: the queue is full
        for path in ("/v1/models/tiny_queue/requests", "/v2/models/tiny_queue/infer"):
            async with http.post(gateway + path, json={**body, "id": "refused-1"}) as response:
                await expect_error(response, 429, "max_queue_len 2")
                assert response.headers["Retry-After"] == "1"
    assert await aredis.xlen(KEYS.queue("tiny_queue")) == 2
    assert not await aredis.exists(KEYS.accepted("refused-1"))


async def test_worker_error_on_a_sync_infer_is_500_with_its_message(
    gateway: str, http: Http
) -> None:
    url = f"{gateway}/v2/models/boom/infer"
    fine = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    async with http.post(url, json=fine) as response:
        assert response.status == 200
        assert (await response.json())["outputs"][0]["data"] == [2, 4, 6, 8]
    bad = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 400]}]}
    async with http.post(url, json=bad) as response:
        await expect_error(response, 500, "input over 100")


async def test_deadline_passed_is_504(
    make_gateway: MakeGateway, http: Http, aredis: aioredis.Redis
) -> None:
    url = (await make_gateway(sync_timeout_s=0.3)).url
    await idle_model(aredis, "never_answered")
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    async with (
        stand_in_worker(aredis, "never_answered"),  # live, but never answers
        http.post(f"{url}/v2/models/never_answered/infer", json=body) as response,
    ):
        await expect_error(response, 504, "no result within 0.3s")
    # and a result that says "expired" is a 504 too
    await idle_model(aredis, "expiring")
    async with http.post(f"{url}/v1/models/expiring/requests", json=body) as response:
        location = response.headers["Location"]
    await answer_next(
        aredis,
        "expiring",
        lambda r: Result.failure(r.id, "expired", "expired", "deadline passed before compute"),
    )
    async with http.get(url + location) as response:
        await expect_error(response, 504, "deadline passed before compute")


async def test_unknown_routes_and_methods_are_json(gateway: str, http: Http) -> None:
    async with http.get(f"{gateway}/nope") as response:
        await expect_error(response, 404, "Not Found")
    async with http.put(f"{gateway}/v2/models/mlp/infer", json={}) as response:
        await expect_error(response, 405, "Method Not Allowed")
        assert "POST" in response.headers["Allow"]


# --------------------------------------------------------------------------- auth


async def test_auth_off_lets_everything_through(gateway: str, http: Http) -> None:
    for path in ("/v2", "/v2/models/mlp", "/metrics", "/v2/health/ready"):
        async with http.get(gateway + path) as response:
            assert response.status == 200, path


async def test_with_tokens_every_endpoint_but_health_needs_one(
    make_gateway: MakeGateway, http: Http, aredis: aioredis.Redis
) -> None:
    url = (await make_gateway(tokens="alpha, beta")).url
    for path in ("/v2/health/live", "/v2/health/ready"):
        async with http.get(url + path) as response:
            assert response.status == 200, path
    before = await aredis.xlen(KEYS.queue("mlp"))
    calls = [
        ("GET", "/v2"), ("GET", "/v2/models/mlp"), ("GET", "/v2/models/mlp/ready"),
        ("POST", "/v2/models/mlp/infer"), ("POST", "/v1/models/mlp/requests"),
        ("GET", "/v1/requests/x"), ("DELETE", "/v1/requests/x"), ("GET", "/metrics"),
    ]  # fmt: skip
    for headers, fragment in [
        ({}, "missing bearer token"),
        ({"Authorization": "Bearer gamma"}, "invalid bearer token"),
        ({"Authorization": "Basic YWxwaGE6"}, "missing bearer token"),
        ({"Authorization": "Bearer alph"}, "invalid bearer token"),
    ]:
        for method, path in calls:
            async with http.request(method, url + path, json=mlp_body(), headers=headers) as r:
                await expect_error(r, 401, fragment)
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert await aredis.xlen(KEYS.queue("mlp")) == before  # nothing enqueued
    for token in ("alpha", "beta"):
        headers = {"Authorization": f"Bearer {token}"}
        async with http.get(f"{url}/v2", headers=headers) as response:
            assert response.status == 200
        async with http.post(f"{url}/v2/models/mlp/infer", json=mlp_body(), headers=headers) as r:
            assert r.status == 200


# --------------------------------------------------------------------------- metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_count_requests_and_read_queues_from_redis(
    gateway: str, http: Http, aredis: aioredis.Redis
) -> None:
    await idle_model(aredis, "metered")
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    for _ in range(3):
        async with http.post(f"{gateway}/v1/models/metered/requests", json=body) as response:
            assert response.status == 202
    for _ in range(2):
        async with http.post(f"{gateway}/v2/models/mlp/infer", json=mlp_body()) as response:
            assert response.status == 200
    async with http.get(f"{gateway}/v2/models/nope") as response:
        assert response.status == 404
    await aredis.xadd(KEYS.dead("metered"), {"req": b"junk", "reason": "test"})
    async with http.get(f"{gateway}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        found = samples(await response.text())

    def requests(endpoint: str, method: str, status: str) -> float:
        labels = (("endpoint", endpoint), ("method", method), ("status", status))
        return found[("tensorq_gateway_requests_total", labels)]

    assert requests("/v2/models/{model}/infer", "POST", "200") == 2
    assert requests("/v1/models/{model}/requests", "POST", "202") == 3
    assert requests("/v2/models/{model}", "GET", "404") == 1
    infer = (("endpoint", "/v2/models/{model}/infer"),)
    assert found[("tensorq_gateway_request_duration_seconds_count", infer)] == 2
    model = (("model", "metered"),)
    assert found[("tensorq_queue_depth", model)] == 3
    assert found[("tensorq_queue_pending", model)] == 0
    assert found[("tensorq_dead_letters", model)] == 1
    assert ("tensorq_queue_oldest_pending_seconds", (("model", "mlp"),)) in found
    assert found[("tensorq_workers_live", ())] == 2
    assert found[("tensorq_redis_up", ())] == 1
    assert found[("tensorq_gateway_requests_in_flight", ())] == 1  # this scrape
