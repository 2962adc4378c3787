"""The operator verbs: ``demo`` (the main job: a local stack and demo
traffic), ``status`` (queues, workers, dead letters) and ``up`` (a local
stack with the gateway, until Ctrl-C). Each entry point is
``register(subparsers)``; what a verb needs is imported when it runs."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from common.aio import run
from common.cli import add_common_flags
from common.extras import GATEWAY_MODULES, POOL_MODULES, require_extra
from common.settings import Settings


def demo_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo", help="the main job: Redis (private if no URL) + worker pool + demo traffic"
    )
    add_common_flags(parser)
    parser.add_argument("--devices", default=None, help="worker devices (default: config)")
    parser.add_argument("--requests", type=int, default=3000, help="MLP requests to send")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent producers")
    parser.set_defaults(func=_demo)


def status_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("status", help="queues, workers, dead letters and Redis memory")
    add_common_flags(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=_status)


def up_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("up", help="Redis + worker pool + gateway, until Ctrl-C")
    add_common_flags(parser)
    parser.add_argument("--devices", default=None, help="worker devices (default: config)")
    parser.add_argument("--host", default=None, help="gateway address (default: config)")
    parser.add_argument("--port", type=int, default=None, help="gateway port (default: config)")
    parser.set_defaults(func=_up)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    require_extra("worker", *POOL_MODULES)
    from producer.ops.stack import ensure_example_models, local_stack

    if not settings.models:
        print("no [[models]] configured (see config/tensorq.toml)")
        return 2
    ensure_example_models(settings)
    print(f"starting: redis {'(private)' if not settings.redis.url else settings.redis.url}, "
          f"worker pool on {args.devices or settings.worker.devices}", flush=True)  # fmt: skip
    started = time.perf_counter()
    with local_stack(settings, devices=args.devices) as stack:
        print(f"pool ready in {time.perf_counter() - started:.1f}s: "
              f"{len(stack.live_workers())} worker(s)", flush=True)  # fmt: skip
        return run(_demo_traffic(settings, stack.redis_url, args))


async def _demo_traffic(settings: Settings, url: str, args: argparse.Namespace) -> int:
    from producer.bench.loadgen import random_inputs, run_load
    from producer.client import AsyncClient

    rng = np.random.default_rng(0)
    failed = 0
    async with AsyncClient(url, settings=settings) as client:
        for model in settings.models:
            spec = await client.spec(model.name)
            requests = args.requests if model.name == settings.models[0].name else 500
            report = await run_load(
                client,
                model.name,
                lambda i, s=spec: random_inputs(s.inputs, 1 + i % 4, rng),  # type: ignore[misc]
                requests=requests,
                concurrency=args.concurrency,
            )
            print(report.line(), flush=True)
            failed += report.errors
    return 1 if failed else 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    from producer.ops.memory import format_redis_memory
    from producer.ops.status import format_status

    if not settings.redis.url:
        print("tensorq status needs a Redis URL (--redis or TQ_REDIS_URL)")
        return 2
    report = run(_status_report(settings))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_status(report) + "\n\n" + format_redis_memory(report["redis"]))
    return 0


async def _status_report(settings: Settings) -> dict[str, Any]:
    """Queues and workers (what the gateway's status shows too), then the
    Redis memory block (``producer.ops.memory``: a bounded SCAN, so the CLI's only)."""
    from producer.ops.memory import collect_redis_memory
    from producer.ops.status import collect_status

    report = await collect_status(settings)
    report["redis"] = await collect_redis_memory(settings)
    return report


def _up(args: argparse.Namespace, settings: Settings) -> int:
    require_extra("worker,gateway", *POOL_MODULES, *GATEWAY_MODULES)
    from producer.ops.up import run_up

    return run_up(args, settings)
