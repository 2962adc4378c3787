"""The worker package's verbs: ``tensorq worker`` and ``tensorq models``."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from common.cli import add_common_flags
from common.devices import parse_devices
from common.embedded_redis import redis_url_or_embedded
from common.extras import require_extra
from common.redis_conn import check_reachable, pooled_client
from common.settings import RedisSettings, Settings

log = logging.getLogger(__name__)


def worker_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("worker", help="run the worker pool: one process per device")
    add_common_flags(parser)
    parser.add_argument(
        "--devices", default=None, help="cuda:0,cuda:1 | cpu | cpu*2 | auto (default: config)"
    )
    parser.set_defaults(func=_run_worker)


def models_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("models", help="example models")
    verbs = parser.add_subparsers(dest="models_verb", metavar="ACTION", required=True)
    reload = verbs.add_parser("reload", help="make every worker load a model's file again")
    add_common_flags(reload)
    reload.add_argument("model")
    reload.set_defaults(func=_reload)
    build = verbs.add_parser("build-examples", help="write the example TorchScript models")
    build.add_argument("directory", type=Path, nargs="?", default=Path("config/models"))
    build.set_defaults(func=_build_examples)


def _run_worker(args: argparse.Namespace, settings: Settings) -> int:
    require_extra("worker", "torch", "prometheus_client")
    from worker.pool import WorkerPool

    if args.devices:
        settings = settings.replace(worker=_replace(settings.worker, devices=args.devices))
    slots = parse_devices(settings.worker.devices, threads=settings.worker.threads)
    with redis_url_or_embedded(settings.redis.url) as url:
        if not settings.redis.url:
            print(f"started a private redis-server at {url}", flush=True)
        settings = settings.replace(redis=_replace(settings.redis, url=url))
        asyncio.run(_check(settings.redis))
        log.info("pool of %d on %s", len(slots), ", ".join(s.label for s in slots))
        logging_setup = (args.log_level, args.log_format)
        return WorkerPool(settings, slots, logging_setup=logging_setup).run()


async def _check(redis_settings: RedisSettings) -> None:
    client = pooled_client(redis_settings)
    try:
        await check_reachable(client, redis_settings.url)
    finally:
        await client.aclose()


def _reload(args: argparse.Namespace, settings: Settings) -> int:
    """Announce a reload; workers serving the model load, warm and switch."""
    from common.keys import Keys
    from common.records import RELOAD, ControlMessage

    async def publish() -> int:
        client = pooled_client(settings.redis)
        try:
            await check_reachable(client, settings.redis.url)
            message = ControlMessage(RELOAD, args.model).encode()
            receivers: int = await client.publish(Keys.of(settings.redis).control_channel, message)
            return receivers
        finally:
            await client.aclose()

    if not settings.redis.url:
        print("tensorq models reload needs a Redis URL (--redis or TQ_REDIS_URL)")
        return 2
    receivers = asyncio.run(publish())
    if settings.redis.is_cluster:  # a cluster counts only the subscribers of one node
        print(f"reload of {args.model!r} announced on the cluster")
    else:
        print(f"reload of {args.model!r} announced to {receivers} worker(s)")
    return 0


def _build_examples(args: argparse.Namespace, settings: Settings) -> int:
    require_extra("worker", "torch")
    from worker.examples import build_examples

    for name, path in build_examples(args.directory).items():
        print(f"{name}: {path}")
    return 0


def _replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)
