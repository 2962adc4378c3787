"""One worker process: pin the device, import torch, load and warm the
models, then serve on a uvloop event loop until SIGTERM.

This module must not import torch at module level: under spawn the child
imports it to find ``worker_main``, and CUDA_VISIBLE_DEVICES has to be in
place before torch first loads.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

from common.devices import DeviceSlot
from common.errors import ConfigError, RedisUnavailable
from common.logs import configure_logging
from common.settings import Settings

log = logging.getLogger(__name__)

# The compute thread drops the GIL inside every torch call (forward, and the
# few calls around it) and must get it back from the event-loop thread, which
# holds it until the switch interval forces it to let go. Python's default
# 5 ms would idle the device between batches; 0.5 ms still had the encoder's
# forward take 1.06-1.14x its CPU time in the pool, 1.02-1.03x at 0.1 ms
# (encoder bench against the in-process sorted reference, alternated: 0.80
# and 0.86 -> 0.90 and 0.90; README "Variable lengths").
GIL_SWITCH_INTERVAL_S = 0.0001

EXIT_FATAL = 3  # configuration errors: restarting would fail the same way


def worker_main(
    slot: DeviceSlot,
    settings: Settings,
    name: str,
    logging_setup: tuple[str, str] = ("info", "text"),
    ready: Any = None,
) -> None:
    """Entry point of a spawned worker process; sets ``ready`` (an Event) once serving."""
    os.environ.update({k: v for k, v in slot.environment().items() if not k.startswith("MALLOC")})
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which drains us
    configure_logging(*logging_setup, process_name=name)
    import uvloop

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        uvloop.run(_serve(slot, settings, name, ready))
    except (ConfigError, RedisUnavailable) as exc:
        log.error("cannot start: %s", exc)
        sys.exit(EXIT_FATAL)


def device_report(slot: DeviceSlot) -> dict[str, Any]:
    """What this process pinned, as torch sees it (published in heartbeats)."""
    import torch

    return {
        "device": slot.label,
        "torch_device": slot.torch_device,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cuda_available": torch.cuda.is_available(),
        "cuda_device_count": torch.cuda.device_count(),
        "threads": torch.get_num_threads(),
    }


async def _serve(slot: DeviceSlot, settings: Settings, name: str, ready: Any) -> None:
    import asyncio

    import torch

    from common.aio import settle_gc
    from common.redis_conn import check_reachable, pooled_client
    from worker.executor import Executor
    from worker.faults import CrashOnRequest
    from worker.registry import load_model
    from worker.service import WorkerService, build_parts

    if slot.kind == "cpu":
        torch.set_num_threads(slot.threads)
    crash_prefix = settings.worker.crash_on_request_prefix
    executor = (
        CrashOnRequest(slot.torch_device, crash_prefix)
        if crash_prefix
        else Executor(slot.torch_device)
    )
    models = [load_model(m, slot.torch_device, executor.warm_up) for m in settings.models]
    if not models:
        raise ConfigError("no [[models]] configured: nothing to serve")
    redis = pooled_client(settings.redis)
    try:
        await check_reachable(redis, settings.redis.url)
        service = WorkerService(settings, redis, name)
        parts = build_parts(
            settings=settings, redis=redis, models=models, executor=executor, name=name,
            device_info=device_report(slot), on_orphaned=service.request_stop,
        )  # fmt: skip
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, service.request_stop)
        log.info("serving %s on %s", [m.name for m in models], slot.label)
        settle_gc()  # the loaded models and parts are never scanned again
        if ready is not None:
            ready.set()
        await service.run(parts)
        if service.failure is not None:
            sys.exit(1)  # drained; the pool restarts us
    finally:
        await redis.aclose()
