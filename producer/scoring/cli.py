"""The offline-scoring verbs: ``score`` and ``batch submit|status|wait|collect``.
Each entry point is ``register(subparsers)``; heavy imports wait until a verb
runs, so ``tensorq --help`` stays fast and lists these verbs without the
``[batch]`` extra, which each verb checks for before it starts any work.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.cli import add_common_flags
from common.extras import POOL_MODULES, require_extra
from common.settings import Settings


def score_command(subparsers: Any) -> None:
    from producer.scoring.score import add_score_arguments

    parser = subparsers.add_parser(
        "score",
        help="score every row of a file, in order, resumable",
        description="Score every row of an .npy/.npz/.safetensors file through the pool and "
        "write the outputs in input order. Without a Redis URL a private redis-server and "
        "worker pool are started for the run.",
    )
    add_common_flags(parser)
    add_score_arguments(parser)
    parser.set_defaults(func=_score)


def batch_command(subparsers: Any) -> None:
    from producer.scoring.batch import DEFAULT_JOB_TIMEOUT_S, DEFAULT_TTL_S, QUEUE
    from producer.scoring.score import add_run_arguments

    parser = subparsers.add_parser(
        "batch",
        help="sharded scoring as RQ jobs: submit|status|wait|collect",
        description=f"Sharded offline scoring as plain RQ jobs on the queue {QUEUE!r}. "
        f"Run them with the standard RQ worker: rq worker {QUEUE} --url REDIS_URL",
    )
    verbs = parser.add_subparsers(dest="batch_verb", metavar="ACTION", required=True)

    submit = verbs.add_parser("submit", help="split an input into shards and enqueue them")
    add_common_flags(submit)
    submit.add_argument("--model", required=True)
    submit.add_argument(
        "--input", action="append", required=True, metavar="FILE", help="as for tensorq score"
    )
    submit.add_argument("--output-dir", required=True, type=Path, help="where parts are written")
    submit.add_argument("--shard-rows", required=True, type=int, metavar="N", help="rows per job")
    add_run_arguments(submit)
    submit.add_argument(
        "--job-timeout",
        type=int,
        default=DEFAULT_JOB_TIMEOUT_S,
        metavar="SECONDS",
        help=f"RQ job timeout (default {DEFAULT_JOB_TIMEOUT_S})",
    )
    submit.add_argument(
        "--ttl",
        type=int,
        default=DEFAULT_TTL_S,
        metavar="SECONDS",
        help="how long the batch record and job results stay in Redis (default 7 days)",
    )
    submit.set_defaults(func=_batch_submit)

    status = verbs.add_parser("status", help="per-shard state and total progress")
    add_common_flags(status)
    status.add_argument("batch_id")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_batch_status)

    wait = verbs.add_parser("wait", help="block until done; non-zero if a shard failed for good")
    add_common_flags(wait)
    wait.add_argument("batch_id")
    wait.add_argument("--timeout", type=float, default=None, metavar="SECONDS")
    wait.add_argument("--no-progress", action="store_true")
    wait.set_defaults(func=_batch_wait)

    collect = verbs.add_parser("collect", help="concatenate the parts in order into one file")
    add_common_flags(collect)
    collect.add_argument("batch_id")
    collect.add_argument("--output", required=True, type=Path, help="FILE.npy or FILE.safetensors")
    collect.add_argument("--overwrite", action="store_true")
    collect.set_defaults(func=_batch_collect)


def _score(args: argparse.Namespace, settings: Settings) -> int:
    if not args.no_progress:
        require_extra("batch", "tqdm")  # the progress bar
    if not settings.redis.url:
        require_extra("worker", *POOL_MODULES)  # a private pool
    from producer.scoring.score import run_score

    return run_score(args, settings)


def _batch_submit(args: argparse.Namespace, settings: Settings) -> int:
    require_extra("batch", "rq")
    from producer.scoring.batch import QUEUE, submit_batch
    from producer.scoring.score import options_from_args

    with _connect(settings) as connection:
        record = submit_batch(
            connection,
            settings,
            model=args.model,
            inputs=args.input,
            output_dir=args.output_dir,
            shard_rows=args.shard_rows,
            options=options_from_args(args),
            job_timeout_s=args.job_timeout,
            ttl_s=args.ttl,
        )
    print(record.batch_id, flush=True)
    print(
        f"batch {record.batch_id}: {record.rows:,} rows of {record.model} in {record.shards} "
        f"shard(s) enqueued on {QUEUE}; parts go to {record.output_dir}\n"
        f"run them with: rq worker {QUEUE} --url <redis url>",
        file=sys.stderr,
    )
    return 0


def _batch_status(args: argparse.Namespace, settings: Settings) -> int:
    require_extra("batch", "rq")
    from producer.scoring.batch import batch_status

    with _connect(settings) as connection:
        status = batch_status(connection, settings.redis.prefix, args.batch_id)
    print(json.dumps(status.to_json(), indent=2) if args.json else status.table())
    return 0


def _batch_wait(args: argparse.Namespace, settings: Settings) -> int:
    require_extra("batch", "rq", *(() if args.no_progress else ("tqdm",)))
    from producer.scoring.batch import BatchStatus, wait_batch

    bar: Any = None

    def progress(status: BatchStatus) -> None:
        nonlocal bar
        if args.no_progress:
            return
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(
                total=status.record.rows,
                initial=status.rows_done,
                unit="row",
                unit_scale=True,
                desc=f"batch {args.batch_id}",
                file=sys.stderr,
                dynamic_ncols=True,
            )
        bar.update(status.rows_done - bar.n)

    try:
        with _connect(settings) as connection:
            status = wait_batch(
                connection,
                settings.redis.prefix,
                args.batch_id,
                timeout_s=args.timeout,
                progress=progress,
            )
    finally:
        if bar is not None:
            bar.close()
    failed = status.failed
    for shard in failed:
        reason = shard.failures[-1] if shard.failures else "no error recorded"
        print(
            f"shard {shard.shard} (rows {shard.start}-{shard.stop - 1}) {shard.state}: {reason}",
            file=sys.stderr,
        )
    done = len(status.shards) - len(failed)
    print(f"batch {args.batch_id}: {done}/{len(status.shards)} shard(s) finished")
    return 1 if failed else 0


def _batch_collect(args: argparse.Namespace, settings: Settings) -> int:
    require_extra("batch", "rq")
    from producer.scoring.collect import collect_batch

    with _connect(settings) as connection:
        summary = collect_batch(
            connection, settings.redis.prefix, args.batch_id, args.output, overwrite=args.overwrite
        )
    text = f"collected {summary.rows:,} rows from {summary.parts} part(s) -> {summary.output}"
    if summary.errors_file is not None:
        text += f"; {summary.failed_rows:,} failed rows listed in {summary.errors_file}"
    print(text)
    return 0


@contextmanager
def _connect(settings: Settings) -> Iterator[Any]:
    """A blocking redis-py client (what RQ uses), checked reachable, closed on exit."""
    import redis

    from common.errors import ConfigError, RedisUnavailable
    from common.redis_url import mask_url

    url = settings.redis.url
    if not url:
        raise ConfigError(
            "tensorq batch needs a shared Redis: --redis URL, TQ_REDIS_URL or [redis] url"
        )
    if settings.redis.is_cluster:
        raise ConfigError(
            "tensorq batch runs its shards as RQ jobs, and RQ needs a single Redis node "
            "(it is not cluster-aware): give batch a non-cluster --redis URL; "
            "tensorq score works on a cluster"
        )
    client = redis.Redis.from_url(
        url,
        socket_timeout=settings.redis.socket_timeout_s,
        socket_connect_timeout=settings.redis.connect_timeout_s,
    )
    try:
        try:
            client.ping()
        except redis.RedisError as exc:
            reason = str(exc).replace(url, mask_url(url))
            raise RedisUnavailable(f"cannot reach Redis at {mask_url(url)}: {reason}") from None
        yield client
    finally:
        client.close()
