"""RQ job functions: score one shard of a batch with the same engine as
``tensorq score``.

``score_shard`` writes its part (``part-00042.npy``) through a ``.partial``
file and a checkpoint beside it, so a retried job continues where the last
attempt stopped, and a job whose part is already complete returns at once.
Progress (``rows``, ``rows_done``) and a line per failed attempt
(``failures``) are kept in ``job.meta``, which ``tensorq batch status``,
rq-dashboard and ``rq info`` can show.

The pool is reached through the Redis the RQ worker was started with
(``rq worker tensorq-batch --url ...``), or ``TQ_REDIS_URL`` when set; other
``TQ_*`` settings (and ``TQ_CONFIG``) apply as usual.

A failed attempt is recorded in ``job.meta`` by ``record_failure``; a test or
drill that injects faults enqueues its own job function (``batch.JOB_FUNCTION``)
that wraps ``score_shard`` and records its faults the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
from rq import get_current_job
from rq.job import Job

from common.settings import Settings, load_settings
from producer.scoring.errors import ScoringError
from producer.scoring.inputs import open_inputs
from producer.scoring.runner import DEFAULT_WINDOW, ScoreOptions, ScoreSummary, score_file

_META_EVERY_S = 1.0
_MAX_FAILURES_KEPT = 10


def score_shard(
    *,
    batch_id: str,
    shard: int,
    prefix: str,
    model: str,
    inputs: list[str],
    start: int,
    stop: int,
    part: str,
    options: dict[str, Any],
) -> dict[str, Any]:
    """Score rows ``[start, stop)`` of ``inputs`` into ``part``; idempotent."""
    job = get_current_job()
    if job is None:
        raise ScoringError("score_shard runs as an RQ job (rq worker tensorq-batch)")
    connection: redis.Redis = job.connection
    try:
        part_path = Path(part)
        if part_path.exists():  # an earlier attempt finished it
            _check_part(part_path, stop - start)
            summary = {"part": part, "rows": stop - start, "skipped": True}
        else:
            settings = _settings_for(connection, prefix)
            result = asyncio.run(
                _score(settings, model, inputs, (start, stop), part_path, options, job)
            )
            summary = result.to_json() | {"part": part, "skipped": False}
    except Exception as exc:
        record_failure(job, exc)
        raise
    job.meta.update(rows=stop - start, rows_done=stop - start)
    job.save_meta()  # type: ignore[no-untyped-call]
    return summary


async def _score(
    settings: Settings,
    model: str,
    inputs: list[str],
    rows: tuple[int, int],
    part: Path,
    options: dict[str, Any],
    job: Job,
) -> ScoreSummary:
    from producer.client import AsyncClient

    run = ScoreOptions(
        rows_per_request=options.get("rows_per_request"),
        window=int(options.get("window", DEFAULT_WINDOW)),
        on_error=str(options.get("on_error", "stop")),
        timeout_s=float(options.get("timeout_s", 300.0)),
        retries=int(options.get("retries", 2)),
        checkpoint_every_s=float(options.get("checkpoint_every_s", 2.0)),
        resume=True,  # a retried shard continues from its own checkpoint
        outputs=tuple(options.get("outputs", ())),
    )
    source = open_inputs(inputs)
    try:
        async with AsyncClient(settings=settings) as client:
            return await score_file(
                client,
                model=model,
                source=source,
                output=part,
                options=run,
                rows=rows,
                progress=_MetaProgress(job),
            )
    finally:
        source.close()


class _MetaProgress:
    """Copies progress into job.meta, at most once a second."""

    def __init__(self, job: Job) -> None:
        self._job = job
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last < _META_EVERY_S and done < total:
            return
        self._last = now
        self._job.meta.update(rows=total, rows_done=done)
        self._job.save_meta()  # type: ignore[no-untyped-call]


def record_failure(job: Job, exc: BaseException) -> None:
    """Keep a line about a failed attempt in ``job.meta["failures"]`` (the last 10)."""
    failures = list(job.meta.get("failures", []))
    failures.append(f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500])
    job.meta["failures"] = failures[-_MAX_FAILURES_KEPT:]
    job.save_meta()  # type: ignore[no-untyped-call]


def _check_part(path: Path, rows: int) -> None:
    source = open_inputs([str(path)])
    try:
        counts = {c.location.shape[0] for c in source.columns.values()}
    finally:
        source.close()
    if counts != {rows}:
        raise ScoringError(f"{path}: exists but holds {sorted(counts)} rows, not {rows}")


def _settings_for(connection: redis.Redis, prefix: str) -> Settings:
    settings = load_settings(None)  # TQ_* environment (and TQ_CONFIG) of the RQ worker
    url = settings.redis.url or redis_url_of(connection)
    return settings.replace(redis=dataclasses.replace(settings.redis, url=url, prefix=prefix))


def redis_url_of(connection: redis.Redis) -> str:
    """The URL of a redis-py client's server (TCP, TLS or unix socket)."""
    pool = connection.connection_pool
    kwargs = pool.connection_kwargs
    user, password = kwargs.get("username"), kwargs.get("password")
    auth = ""
    if password:
        auth = f"{quote(user or '', safe='')}:{quote(str(password), safe='')}@"
    elif user:
        auth = f"{quote(user, safe='')}@"
    db = kwargs.get("db", 0)
    if kwargs.get("path"):
        return f"unix://{auth}{kwargs['path']}?db={db}"
    scheme = "rediss" if "SSL" in pool.connection_class.__name__ else "redis"
    return f"{scheme}://{auth}{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"
