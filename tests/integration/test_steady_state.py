"""Steady state on a real redis-server with a real pool: nothing per request
outlives its TTL. After kept submits (collected and not), infers, a caller-
chosen id, a cancelled request, an expired one and the client's close, every
per-request key has a TTL, the streams are empty, and once the short TTLs
pass only the deployment's own keys are left. And the collected results'
TTL: shortened for what this client handed to its caller, left long for what
nobody collected, what another client read by id, and ``keep=True``."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import redis

from common.keys import Keys
from common.settings import RedisSettings, Settings
from producer import AsyncClient, Submission
from tests.conftest import PoolHandle, async_wait_until, write_config

KEYS = Keys()
X = np.ones((1, 256), np.float32)
# What a deployment keeps whatever its traffic: registries, the streams (empty
# once answered, their group kept), their request counters, dead letters.
DEPLOYMENT_KEY = re.compile(rb"tq:(models|workers|q:[^:]+(:high)?|qn:[^:]+(:high)?|dead:[^:]+)")
PER_REQUEST = (b"tq:r:", b"tq:cancel:", b"tq:acc:", b"tq:sub:")


def kind_of_keys(sync_redis: redis.Redis, prefixes: tuple[bytes, ...]) -> list[bytes]:
    return [k for k in sync_redis.scan_iter(count=1000) if k.startswith(prefixes)]


async def test_after_the_ttls_redis_holds_nothing_per_request(
    tmp_path: Path,
    models_dir: Path,
    redis_url: str,
    sync_redis: redis.Redis,
    start_pool: Callable[..., PoolHandle],
) -> None:
    config = write_config(tmp_path / "tensorq.toml", models_dir)
    start_pool(config, redis_url, devices="cpu", workers=1, env={"TQ_REDIS_RESULT_TTL_S": "2"})
    settings = Settings(
        redis=RedisSettings(url=redis_url, result_ttl_s=2, collected_result_ttl_s=1)
    )
    async with AsyncClient(settings=settings) as client:
        # Behind a backlog: one request cancelled while queued, one whose
        # deadline passes while queued.
        image = np.ones((4, 3, 32, 32), np.float32)
        backlog = await client.submit_many([Submission("cnn", {"x": image}) for _ in range(600)])
        cancelled = await client.submit("cnn", {"x": image[:1]})
        await client.cancel(cancelled)
        expired = await client.submit("cnn", {"x": image[:1]}, timeout=0.1)
        assert (await client.wait(cancelled, timeout=120)).status == "cancelled"
        assert (await client.wait(expired, timeout=120)).status == "expired"
        assert {(await client.wait(i, timeout=120)).status for i in backlog} == {"ok"}

        kept: list[str] = []
        for _ in range(3):
            kept += await client.submit_many([Submission("mlp", {"x": X}) for _ in range(100)])
        assert {(await client.wait(i, timeout=60)).status for i in kept} == {"ok"}
        chosen = await client.submit("mlp", {"x": X}, request_id="chosen-1")  # tq:acc:<id>
        assert (await client.result(chosen, timeout=60))["y"].shape == (1, 10)
        for _ in range(20):
            assert (await client.infer("mlp", {"x": X}, timeout=60))["y"].shape == (1, 10)
        forgotten = await client.submit_many([Submission("mlp", {"x": X}) for _ in range(20)])
        # the client holds only what nobody has waited for
        assert set(client._inbox.waiters) <= set(forgotten)
        assert client._inbox.kept <= set(forgotten)
        # answered (results are written in the commit that deletes their entries)
        await async_wait_until(
            lambda: sync_redis.xlen(KEYS.queue("mlp")) == 0, 60, "the forgotten answered"
        )

    # Closed: nothing per request without a TTL (a key without one would never go).
    for key in kind_of_keys(sync_redis, (*PER_REQUEST, b"tq:inbox:")):
        assert sync_redis.pttl(key) != -1, f"{key!r} has no TTL"
    for model in ("mlp", "cnn"):
        assert sync_redis.xlen(KEYS.queue(model)) == sync_redis.xlen(KEYS.dead(model)) == 0

    await async_wait_until(
        lambda: not kind_of_keys(sync_redis, PER_REQUEST), 30, "per-request keys expired"
    )
    left = [k for k in sync_redis.scan_iter(count=1000) if not DEPLOYMENT_KEY.fullmatch(k)]
    for key in left:  # the closed client's inbox may linger a minute, with its TTL
        assert key.startswith(b"tq:inbox:") and sync_redis.pttl(key) != -1, key


async def test_a_collected_result_is_shortened_and_the_others_keep_theirs(
    tmp_path: Path,
    models_dir: Path,
    redis_url: str,
    sync_redis: redis.Redis,
    start_pool: Callable[..., PoolHandle],
) -> None:
    config = write_config(tmp_path / "tensorq.toml", models_dir)
    start_pool(config, redis_url, devices="cpu", workers=1)  # results kept 3600 s
    settings = Settings(redis=RedisSettings(url=redis_url))  # collected: 60 s
    async with AsyncClient(settings=settings) as client, AsyncClient(redis_url) as other:
        collected = await client.submit_many([Submission("mlp", {"x": X}) for _ in range(40)])
        for request_id in collected:
            assert (await client.result(request_id, timeout=60))["y"].shape == (1, 10)
        handed_on = await client.submit("mlp", {"x": X})
        await client.wait(handed_on, timeout=60, keep=True)
        read_elsewhere = await client.submit("mlp", {"x": X})
        assert (await other.wait(read_elsewhere, timeout=60)).status == "ok"  # not its own
        uncollected = await client.submit_many([Submission("mlp", {"x": X}) for _ in range(10)])
        await async_wait_until(
            lambda: sync_redis.exists(*(KEYS.result(i) for i in uncollected)) == len(uncollected),
            60,
            "the uncollected requests answered",
        )

        def ttl(request_id: str) -> int:
            return int(sync_redis.ttl(KEYS.result(request_id)))

        await async_wait_until(
            lambda: all(0 < ttl(i) <= 60 for i in collected), 30, "collected results shortened"
        )
        for request_id in [handed_on, read_elsewhere, *uncollected]:
            assert ttl(request_id) > 60, request_id
