"""The producer package's verbs: ``demo`` (the main job), ``bench``, ``status``."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import uvloop

from common.cli import add_common_flags
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
    parser = subparsers.add_parser("status", help="queues, workers and dead letters")
    add_common_flags(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=_status)


def bench_command(subparsers: Any) -> None:
    from producer.bench import add_bench_arguments

    parser = subparsers.add_parser("bench", help="throughput/latency against two references")
    add_common_flags(parser)
    add_bench_arguments(parser)
    parser.set_defaults(func=_bench)


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    from producer.bench import run_bench

    return run_bench(args, settings)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from producer.stack import ensure_example_models, local_stack

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
        return uvloop.run(_demo_traffic(settings, stack.redis_url, args))


async def _demo_traffic(settings: Settings, url: str, args: argparse.Namespace) -> int:
    from producer.client import AsyncClient
    from producer.loadgen import random_inputs, run_load

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
    from producer.status import collect_status, format_status

    if not settings.redis.url:
        print("tensorq status needs a Redis URL (--redis or TQ_REDIS_URL)")
        return 2
    report = uvloop.run(collect_status(settings))
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return 0
