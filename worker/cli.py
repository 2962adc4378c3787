"""The worker package's verbs: ``tensorq worker`` and ``tensorq models``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from common.backoff import Poll
from common.cli import add_common_flags
from common.devices import parse_devices
from common.embedded_redis import redis_url_or_embedded
from common.extras import require_extra
from common.keys import Keys
from common.records import RELOAD, ControlMessage, ReloadAnswer, live_workers
from common.redis_conn import check_reachable, pooled_client
from common.settings import RedisSettings, Settings, apply_flags

log = logging.getLogger(__name__)

RELOAD_TIMEOUT_S = 60.0  # how long `tensorq models reload` waits for the workers' answers
ANSWER_POLL_S = 1.0  # between checks that the workers still missing are alive
SUBSCRIBE_WAIT_S = 5.0  # the most a reload waits for live workers to subscribe


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
    reload = verbs.add_parser(
        "reload",
        help="make every worker serving a model load its file again; waits for their answers",
    )
    add_common_flags(reload)
    reload.add_argument("model")
    reload.add_argument(
        "--timeout",
        type=float,
        default=RELOAD_TIMEOUT_S,
        help=f"seconds to wait for every worker's answer (default {RELOAD_TIMEOUT_S:.0f})",
    )
    reload.set_defaults(func=_reload)
    build = verbs.add_parser("build-examples", help="write the example TorchScript models")
    build.add_argument("directory", type=Path, nargs="?", default=Path("config/models"))
    build.set_defaults(func=_build_examples)


def _run_worker(args: argparse.Namespace, settings: Settings) -> int:
    require_extra("worker", "torch", "prometheus_client")
    from worker.pool import WorkerPool

    settings = apply_flags(settings, {"worker.devices": ("--devices", args.devices)})
    settings.require_models()  # before a private redis-server or any worker starts
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
    """Announce a reload to the live workers serving the model (of this
    prefix and database) and wait for each one's answer: exit 0 when all
    reloaded (or found the file unchanged), 1 when any failed or did not
    answer within ``--timeout``, 2 when no live worker serves the model."""
    if not settings.redis.url:
        print("tensorq models reload needs a Redis URL (--redis or TQ_REDIS_URL)", file=sys.stderr)
        return 2
    if not args.timeout > 0:
        print(f"tensorq models reload: --timeout must be > 0, got {args.timeout}", file=sys.stderr)
        return 2
    return asyncio.run(_announce_reload(settings.redis, args.model, args.timeout))


async def _announce_reload(redis_settings: RedisSettings, model: str, timeout_s: float) -> int:
    keys = Keys.of(redis_settings)
    client = pooled_client(redis_settings)
    try:
        await check_reachable(client, redis_settings.url)
        live = live_workers(await client.hgetall(keys.workers))  # type: ignore[misc]
        serving = {w.name for w in live if model in w.models}
        if not serving:
            served = sorted({m for w in live for m in w.models})
            print(
                f"tensorq models reload: no live worker serves model {model!r} "
                f"({len(live)} live worker(s){', serving ' + ', '.join(served) if served else ''})",
                file=sys.stderr,
            )
            return 2
        if not redis_settings.is_cluster:  # (Cluster counts subscribers per node)
            await _until_subscribed(client, keys.control_channel, len(live), timeout_s)
        reply_to = keys.reply(secrets.token_hex(8))
        await client.publish(keys.control_channel, ControlMessage(RELOAD, model, reply_to).encode())
        print(f"reload of {model!r} announced; waiting for {len(serving)} worker(s)", flush=True)
        answers = await _collect_answers(client, keys, reply_to, serving, timeout_s)
        await client.delete(reply_to)
    finally:
        await client.aclose()
    failed = 0
    for name in sorted(serving):
        answer = answers.get(name)
        if answer is None:
            print(f"{name}: no answer within {timeout_s:g}s (stopped, or still loading)")
        else:
            print(answer.describe())
        failed += answer is None or not answer.ok
    if failed:
        print(f"tensorq models reload: {failed} of {len(serving)} worker(s) did not reload "
              f"{model!r}", file=sys.stderr)  # fmt: skip
    return 1 if failed else 0


async def _until_subscribed(client: Any, channel: str, workers: int, timeout_s: float) -> None:
    """Until every live worker listens on the control channel (one that has
    just started beats before it subscribes), at most ``SUBSCRIBE_WAIT_S``."""
    deadline = time.monotonic() + min(timeout_s, SUBSCRIBE_WAIT_S)
    poll = Poll(first=0.02, cap=0.25)
    while time.monotonic() < deadline:
        [(_, listening)] = await client.pubsub_numsub(channel)
        if listening >= workers:
            return
        await poll.sleep()


async def _collect_answers(
    client: Any, keys: Keys, reply_to: str, serving: set[str], timeout_s: float
) -> dict[str, ReloadAnswer]:
    """Each serving worker's answer, until all have answered, ``timeout_s``
    passed, or the ones still missing are no longer live."""
    answers: dict[str, ReloadAnswer] = {}
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0 and not serving <= set(answers):
        popped = await client.blpop([reply_to], timeout=min(left, ANSWER_POLL_S))
        if popped is not None:
            try:
                answer = ReloadAnswer.decode(popped[1])
            except ValueError as exc:
                log.warning("ignoring an unreadable reload answer: %s", exc)
                continue
            answers.setdefault(answer.worker, answer)
            continue
        alive = {w.name for w in live_workers(await client.hgetall(keys.workers))}
        if not (serving - set(answers)) & alive:  # the missing ones stopped meanwhile
            break
    return answers


def _build_examples(args: argparse.Namespace, settings: Settings) -> int:
    require_extra("worker", "torch")
    from worker.examples import build_examples

    for name, path in build_examples(args.directory).items():
        print(f"{name}: {path}")
    return 0


def _replace(obj: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(obj, **changes)
