"""The gateway knows when no worker is there: readiness that is false answers
503 (as load balancers expect), a sync infer for a model no live worker
serves answers 503 at once instead of waiting out ``sync_timeout_s`` (while
a model whose worker is merely busy still queues), and all of it comes from
a view of the workers refreshed in the background, not a Redis round trip
per request. With tokens set, a browser signs in to the status page once
and a cookie does the rest. A real redis-server with no pool: the test
plays the one worker it needs (a heartbeat, and ``answer_next``)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import fakeredis
import pytest
import redis.asyncio as aioredis
from yarl import URL

from common.embedded_redis import EmbeddedRedis
from common.keys import Keys
from common.records import WorkerHeartbeat, now_ms
from common.settings import GatewaySettings, RedisSettings, Settings
from producer.gateway import RunningGateway, start
from producer.gateway.auth import COOKIE, session_value
from producer.gateway.live import LiveView
from tests.gateway_stack import answer_next, doubled, idle_model, until

KEYS = Keys()
SYNC_TIMEOUT_S = 120.0  # a request that waited it out would outlast the test's timeout
BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}

MakeGateway = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture(scope="module")
def bare_redis() -> Iterator[str]:
    """A Redis no worker pool uses."""
    with EmbeddedRedis() as url:
        yield url


@pytest.fixture
async def aredis(bare_redis: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(bare_redis)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def make_gateway(bare_redis: str, aredis: aioredis.Redis) -> AsyncIterator[MakeGateway]:
    started: list[RunningGateway] = []

    async def make(**gateway: Any) -> RunningGateway:
        config = GatewaySettings(port=0, sync_timeout_s=SYNC_TIMEOUT_S, **gateway)
        running = await start(Settings(redis=RedisSettings(url=bare_redis), gateway=config))
        started.append(running)
        return running

    yield make
    for running in started:
        await running.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # unsafe: keep cookies of an IP-address host (127.0.0.1)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def beat(redis: aioredis.Redis, *models: str, alive: bool = True) -> None:
    """One heartbeat of the test's stand-in worker (live for LIVE_WITHIN_MS)."""
    record = WorkerHeartbeat("stand-in", os.getpid(), alive, int(now_ms()), models=list(models))
    await redis.hset(KEYS.workers, record.name, record.encode())


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        return response.status, await response.json()


# --------------------------------------------------------------------------- readiness


async def test_readiness_that_is_false_is_503(
    make_gateway: MakeGateway, http: aiohttp.ClientSession, aredis: aioredis.Redis
) -> None:
    url = (await make_gateway()).url
    await idle_model(aredis, "held")
    assert await get(http, f"{url}/v2/health/ready") == (
        503,
        {"ready": False, "error": "no live worker"},
    )
    status, doc = await get(http, f"{url}/v2/models/held/ready")
    assert status == 503 and doc["ready"] is False
    assert doc["error"] == "no live worker serves model 'held' (0 live worker(s))"

    await beat(aredis, "other")  # a live worker, not of this model
    assert await get(http, f"{url}/v2/health/ready") == (200, {"ready": True})
    assert (await get(http, f"{url}/v2/models/held/ready"))[0] == 503
    await beat(aredis, "other", "held")
    assert await get(http, f"{url}/v2/models/held/ready") == (200, {"name": "held", "ready": True})

    await beat(aredis, "other", "held", alive=False)  # signed off: seen at the next refresh

    async def not_ready() -> bool:
        return (await get(http, f"{url}/v2/health/ready"))[0] == 503

    await until(not_ready, what="readiness to see the worker gone")
    assert (await get(http, f"{url}/v2/models/held/ready"))[0] == 503
    assert (await get(http, f"{url}/v2/models/nope/ready"))[0] == 404


# --------------------------------------------------------------------------- sync infer


async def test_sync_infer_without_a_live_worker_is_503_at_once(
    make_gateway: MakeGateway, http: aiohttp.ClientSession, aredis: aioredis.Redis
) -> None:
    url = (await make_gateway(retry_after_s=7)).url
    await idle_model(aredis, "held")
    await beat(aredis, "other")  # a live worker, serving something else
    async with http.post(f"{url}/v2/models/held/infer", json=BODY) as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "7"
        assert response.content_type == "application/json"
        assert await response.json() == {
            "error": "no live worker serves model 'held' (1 live worker(s)): "
            "nothing would answer this request"
        }
    assert await aredis.xlen(KEYS.queue("held")) == 0  # nothing enqueued
    # asynchronous submission still queues: a worker may come for it later
    async with http.post(f"{url}/v1/models/held/requests", json=BODY) as response:
        assert response.status == 202
    assert await aredis.xlen(KEYS.queue("held")) == 1


async def test_a_busy_worker_still_gets_the_request_queued(
    make_gateway: MakeGateway, http: aiohttp.ClientSession, aredis: aioredis.Redis
) -> None:
    """The worker came up after the gateway's last look at the workers: the
    refusal is confirmed by a fresh read first, so the request is queued."""
    url = (await make_gateway()).url
    await idle_model(aredis, "held")
    await beat(aredis, "held")

    async def infer() -> tuple[int, Any]:
        async with http.post(f"{url}/v2/models/held/infer", json=BODY) as response:
            return response.status, await response.json()

    waiting = asyncio.create_task(infer())
    await until(lambda: aredis.xlen(KEYS.queue("held")), what="the request to be queued")
    await answer_next(aredis, "held", doubled)
    status, doc = await waiting
    assert status == 200 and doc["outputs"][0]["data"] == [2, 4, 6, 8]


async def test_the_view_costs_no_round_trip_while_a_worker_serves_the_model() -> None:
    redis = fakeredis.FakeAsyncRedis()
    reads = 0
    hgetall = redis.hgetall

    def counted(*args: Any) -> Any:
        nonlocal reads
        reads += 1
        return hgetall(*args)

    redis.hgetall = counted  # type: ignore[method-assign,assignment]
    view = LiveView(redis, KEYS, "redis://unused")
    await beat(redis, "held")
    await view.fresh()
    assert reads == 1
    for _ in range(100):
        assert await view.unserved("held") == ""
        assert await view.confirmed_problem("held") == ""
    assert reads == 1  # all answered from the view
    assert await view.unserved("other") == "no live worker serves model 'other' (1 live worker(s))"
    assert reads == 2  # a refusal is confirmed by one fresh read
    await asyncio.gather(*(view.unserved("other") for _ in range(20)))
    assert reads <= 4  # waiting callers share a read


# --------------------------------------------------------------------------- status page


async def test_the_status_page_signs_in_once_then_uses_a_cookie(
    make_gateway: MakeGateway, http: aiohttp.ClientSession
) -> None:
    url = (await make_gateway(tokens=("alpha", "beta"))).url
    async with http.get(f"{url}/", allow_redirects=False) as response:
        assert response.status == 401 and response.content_type == "text/html"
        assert 'action="/login"' in await response.text()
    assert (await get(http, f"{url}/v1/status"))[0] == 401
    async with http.post(f"{url}/login", data={"token": "gamma"}, allow_redirects=False) as r:
        assert r.status == 401 and "not valid" in await r.text()
    assert not http.cookie_jar.filter_cookies(URL(url))

    async with http.post(f"{url}/login", data={"token": "beta"}, allow_redirects=False) as r:
        assert (r.status, r.headers["Location"]) == (303, "/")
        cookie = r.cookies[COOKIE]
        assert cookie.value == session_value("beta") and "beta" not in cookie.value
        assert cookie["httponly"] and cookie["samesite"] == "Strict"
    async with http.get(f"{url}/") as response:  # the cookie stands for the token
        assert response.status == 200 and "<title>tensorq status</title>" in await response.text()
    status, report = await get(http, f"{url}/v1/status")
    assert status == 200 and set(report) == {"models", "workers"}
    async with http.post(f"{url}/v2/models/held/infer", json=BODY) as response:
        assert response.status == 401  # never for a request that enqueues
    async with http.delete(f"{url}/v1/requests/some-id") as response:
        assert response.status == 401  # nor one that cancels

    http.cookie_jar.clear()
    async with http.get(f"{url}/?token=nope", allow_redirects=False) as response:
        assert response.status == 401 and "not valid" in await response.text()
    async with http.get(f"{url}/?token=alpha", allow_redirects=False) as response:
        assert (response.status, response.headers["Location"]) == (303, "/")
    assert (await get(http, f"{url}/v1/status"))[0] == 200
    http.cookie_jar.clear()
    http.cookie_jar.update_cookies({COOKIE: "forged"}, URL(url))
    assert (await get(http, f"{url}/v1/status"))[0] == 401
    headers = {"Authorization": "Bearer alpha"}  # scripts keep using the header
    async with http.get(f"{url}/v1/status", headers=headers) as response:
        assert response.status == 200
