"""Fixtures of the client's unit tests: a fakeredis whose model registry
holds the test module's ``SPEC``, and an AsyncClient on it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import fakeredis
import pytest

from common.keys import Keys
from producer import AsyncClient


@pytest.fixture
async def fake(request: pytest.FixtureRequest) -> AsyncIterator[fakeredis.FakeAsyncRedis]:
    spec = request.module.SPEC
    server = fakeredis.FakeAsyncRedis()
    await server.hset(Keys().models, spec.name, spec.to_json())
    yield server
    await server.aclose()


@pytest.fixture
async def client(fake: fakeredis.FakeAsyncRedis) -> AsyncIterator[AsyncClient]:
    async with AsyncClient("redis://fake", redis=fake) as c:
        yield c
