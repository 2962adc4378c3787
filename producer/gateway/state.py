"""What a running gateway holds (one Redis pool, one AsyncClient sharing it,
the long-poll watcher) and the typed AppKeys handlers reach it by.

Redis calls made here (not through the client) turn redis errors into
``RedisUnavailable`` (503), as the client does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from common.codec import CodecLimits
from common.errors import RedisUnavailable, UnknownModel
from common.ids import check_request_id
from common.keys import Keys
from common.records import AcceptedMarker
from common.redis_url import mask_url
from common.settings import Settings
from common.spec import ModelSpec
from producer.client import AsyncClient
from producer.gateway.bf16 import client_inputs, takes_bf16
from producer.gateway.errors import HTTPProblem
from producer.gateway.metrics import GatewayMetrics
from producer.gateway.oip import OutputRequest
from producer.gateway.results import Followers, ResultWatcher

T = TypeVar("T")


@dataclass
class Gateway:
    settings: Settings
    redis: aioredis.Redis
    client: AsyncClient
    watcher: ResultWatcher
    followers: Followers
    sync_ids: set[str] = field(default_factory=set)  # client-given ids of sync requests in flight

    @property
    def keys(self) -> Keys:
        return self.client.keys

    @property
    def limits(self) -> CodecLimits:
        return self.settings.limits.codec()

    async def spec(self, model: str, version: str | None = None) -> ModelSpec:
        """The served model's spec (UnknownModel: 404), at ``version`` if one is named."""
        spec = await self.client.spec(model)
        if version is not None and version != spec.version:
            raise UnknownModel(
                f"model {model!r} has no version {version!r} (serving {spec.version!r})"
            )
        return spec

    async def submit(
        self,
        spec: ModelSpec,
        arrays: Mapping[str, np.ndarray[Any, Any]],
        *,
        request_id: str | None,
        timeout: float | None,
        priority: int = 0,
        store: bool = True,
    ) -> str:
        """Enqueue through the shared client; ``store`` False for requests only
        this gateway waits for (sync infer): their results are not kept by id."""
        if takes_bf16(spec):  # converted for the client below: check the wire arrays first
            spec.check_inputs(arrays, request_id=request_id)
            inputs = await client_inputs(arrays, spec)
        else:
            inputs = arrays
        return await self.client.submit(
            spec.name,
            inputs,
            request_id=request_id,
            timeout=timeout,
            priority=priority,
            store=store,
        )

    async def accept(
        self,
        spec: ModelSpec,
        arrays: Mapping[str, np.ndarray[Any, Any]],
        *,
        request_id: str | None,
        timeout: float | None,
        priority: int,
        wanted: OutputRequest,
    ) -> str:
        """Enqueue an async request and write its marker ``tq:acc:<id>``.

        A client-given id is claimed first (SET NX), so an id in use, or
        whose result still exists, is refused with 409 and nothing enqueued."""
        ttl = self.settings.redis.result_ttl_s
        marker = AcceptedMarker(spec.name, wanted.to_json()).encode()
        if request_id is None:
            request_id = await self.submit(spec, arrays, request_id=None, timeout=timeout,
                                           priority=priority)  # fmt: skip
            await self._call(self.redis.set(self.keys.accepted(request_id), marker, ex=ttl))
            return request_id
        check_request_id(request_id)  # the id rule of the client (400), before a marker is claimed
        accepted = self.keys.accepted(request_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(accepted, marker, ex=ttl, nx=True)
            pipe.exists(self.keys.result(request_id))
            claimed, finished = await self._call(pipe.execute())
        if not claimed or finished:
            if claimed:
                await self._call(self.redis.delete(accepted))
            raise HTTPProblem(409, f"request id {request_id!r} is already in use")
        try:
            return await self.submit(spec, arrays, request_id=request_id, timeout=timeout,
                                     priority=priority)  # fmt: skip
        except Exception:
            await self._call(self.redis.delete(accepted))
            raise

    async def fetch(self, request_id: str) -> tuple[bytes | None, AcceptedMarker | None]:
        """The stored result (raw msgpack) and the gateway's marker of a request."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.keys.result(request_id))
            pipe.get(self.keys.accepted(request_id))
            raw, marker = await self._call(pipe.execute())
        return raw, (AcceptedMarker.decode(marker) if marker is not None else None)

    async def cancel(self, request_id: str) -> None:
        await self._call(self.client.cancel(request_id))

    async def _call(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except RedisError as exc:
            url = mask_url(self.settings.redis.url)
            raise RedisUnavailable(f"Redis at {url}: {exc}") from None


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", GatewayMetrics)
GATEWAY = web.AppKey("gateway", Gateway)
