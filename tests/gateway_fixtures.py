"""Fixtures of the gateway tests, loaded with ``pytest_plugins =
["tests.gateway_fixtures"]`` (helpers and the stack itself: tests/gateway_stack.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from common.embedded_redis import EmbeddedRedis
from producer.gateway import RunningGateway, start
from producer.ops.stack import local_stack
from tests.conftest import write_config
from tests.gateway_stack import RESULT_TTL_S, GatewayStack, build_test_models


@pytest.fixture(scope="session")
def gw_stack(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[GatewayStack]:
    directory = tmp_path_factory.mktemp("gateway")
    extra = build_test_models(directory)
    config = write_config(directory / "tensorq.toml", models_dir, extra=extra)
    with EmbeddedRedis() as url:
        stack = GatewayStack(url, config)
        env = {"TQ_REDIS_RESULT_TTL_S": str(RESULT_TTL_S)}
        with local_stack(stack.settings(), devices="cpu*2", extra_env=env):
            yield stack


@pytest.fixture
async def make_gateway(
    gw_stack: GatewayStack,
) -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
    """Start in-process gateways (``[gateway]`` overrides as keywords); stopped after the test."""
    started: list[RunningGateway] = []

    async def make(**gateway: object) -> RunningGateway:
        running = await start(gw_stack.settings(**gateway))
        started.append(running)
        return running

    yield make
    for running in started:
        await running.stop()


@pytest.fixture
async def gateway(make_gateway: Callable[..., Awaitable[RunningGateway]]) -> str:
    """The URL of a gateway with default settings."""
    return (await make_gateway()).url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def aredis(gw_stack: GatewayStack) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(gw_stack.redis_url)
    yield client
    await client.aclose()
