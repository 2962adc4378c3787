"""Serving the gateway: one listening socket on uvloop, and a graceful stop.

On SIGTERM or SIGINT the socket closes (new connections are refused),
long-polls answer at once, sync inference requests in flight get up to
``sync_timeout_s`` plus a grace to finish, and only then are the client and
the Redis pool closed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from aiohttp import web

from common import aio
from common.settings import Settings
from producer.gateway.app import create_app

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0
BACKLOG = 4096  # a burst of new connections queues in the kernel, not in SYN retries


@dataclass
class RunningGateway:
    runner: web.AppRunner
    url: str

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start(settings: Settings) -> RunningGateway:
    """Start serving ``settings.gateway.host:port`` (port 0: any free port)."""
    config = settings.gateway
    runner = web.AppRunner(
        create_app(settings),
        handle_signals=False,
        access_log=logging.getLogger("aiohttp.access") if log.isEnabledFor(logging.DEBUG) else None,
        shutdown_timeout=config.sync_timeout_s + SHUTDOWN_GRACE_S,
    )
    try:
        await runner.setup()  # connects to Redis: RedisUnavailable if it cannot
        site = web.TCPSite(runner, config.host, config.port, backlog=BACKLOG)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    host, port = runner.addresses[0][:2]
    shown = f"[{host}]" if ":" in host else host
    return RunningGateway(runner, f"http://{shown}:{port}")


async def serve(settings: Settings) -> int:
    running = await start(settings)
    aio.settle_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"tensorq gateway listening on {running.url}", flush=True)
    await stop.wait()
    log.info("gateway stopping: finishing requests in flight")
    await running.stop()
    log.info("gateway stopped")
    return 0


def run(settings: Settings) -> int:
    """Serve on uvloop (where installed) until SIGTERM/SIGINT; the exit code."""
    return aio.run(serve(settings))
