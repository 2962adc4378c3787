"""The gateway application: ``create_app(settings)`` builds it; its cleanup
contexts own the Redis pool and the AsyncClient that shares it (opened at
start-up, closed after the last in-flight request) and the background tasks
that keep model specs and the view of live workers (producer/gateway/live.py)
fresh.

Middlewares, outermost first: metrics (sees every final status), errors
(every failure becomes a JSON body), auth (when tokens are configured).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from common.aio import wait_any
from common.errors import TensorQError
from common.redis_conn import pooled_client
from common.settings import Settings
from producer.client import AsyncClient
from producer.gateway import routes_v1, routes_v2, status_page
from producer.gateway.auth import TOKENS, Tokens, auth_middleware
from producer.gateway.errors import error_middleware
from producer.gateway.live import LIVE, LiveView
from producer.gateway.metrics import GatewayMetrics
from producer.gateway.results import Followers, ResultWatcher
from producer.gateway.state import GATEWAY, METRICS, SETTINGS, Gateway

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> web.Application:
    config = settings.gateway
    metrics = GatewayMetrics()
    middlewares = [metrics.middleware(), error_middleware(config.retry_after_s)]
    if config.tokens:
        middlewares.append(auth_middleware(config.tokens))
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares)
    if config.tokens:
        app[TOKENS] = Tokens(config.tokens)  # the status page's sign-in
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app.cleanup_ctx.append(_gateway)
    app.cleanup_ctx.append(_refresh_specs)
    app.cleanup_ctx.append(_watch_workers)
    app.on_shutdown.append(_answer_long_polls)
    routes_v2.add_routes(app.router)
    routes_v1.add_routes(app.router)
    status_page.add_routes(app.router)
    app.router.add_get("/metrics", _metrics)
    return app


async def _gateway(app: web.Application) -> AsyncIterator[None]:
    """One Redis pool for the whole gateway, shared with its one AsyncClient."""
    settings = app[SETTINGS]
    redis = pooled_client(settings.redis)
    client = AsyncClient(settings=settings, redis=redis)
    try:
        await client.connect()  # RedisUnavailable names the masked URL
        await client.models(refresh=True)
    except BaseException:
        await redis.aclose()
        raise
    watcher = ResultWatcher(redis, client.keys, interval_s=settings.gateway.poll_interval_ms / 1000)
    followers = Followers(client, watcher, timeout_s=settings.redis.result_ttl_s)
    app[GATEWAY] = Gateway(settings, redis, client, watcher, followers)
    yield
    await followers.close()
    await watcher.close()
    await client.close()
    await redis.aclose()


async def _refresh_specs(app: web.Application) -> AsyncIterator[None]:
    """Re-read tq:models now and then, so a model removed or re-declared by
    its workers is seen without a restart."""
    gw = app[GATEWAY]

    stop = asyncio.Event()

    async def refresh() -> None:
        while not stop.is_set():
            await wait_any(stop, timeout=gw.settings.gateway.spec_refresh_s)
            if stop.is_set():
                return
            try:
                await gw.client.models(refresh=True)
            except TensorQError as exc:
                log.warning("cannot refresh model specs: %s", exc)

    task = asyncio.create_task(refresh(), name="spec-refresh")
    yield
    stop.set()  # by flag, not cancel (common/aio.py)
    await task


async def _watch_workers(app: web.Application) -> AsyncIterator[None]:
    """Keep ``app[LIVE]``, the view of which models a live worker serves
    (readiness, and the 503 of a sync infer nothing would answer)."""
    gw = app[GATEWAY]
    view = LiveView(gw.redis, gw.keys, gw.settings.redis.url)
    await view.fresh()
    app[LIVE] = view
    stop = asyncio.Event()
    task = asyncio.create_task(view.run(stop), name="live-workers")
    yield
    stop.set()  # by flag, not cancel (common/aio.py)
    await task


async def _answer_long_polls(app: web.Application) -> None:
    """On shutdown, long-polls answer their current state at once; sync
    inference requests in flight are left to finish."""
    await app[GATEWAY].watcher.close()


async def _metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    body, content_type = await request.app[METRICS].render(
        gw.settings, gw.redis, request.headers.get("Accept")
    )
    return web.Response(body=body, headers={"Content-Type": content_type})
