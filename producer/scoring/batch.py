"""RQ batch jobs for big sharded runs: submit, status and wait (``collect``
concatenates the parts).

``submit`` checks the input against the model (nothing is enqueued for a
bad file), splits its rows into shards of ``shard_rows`` and enqueues one
plain RQ job per shard on the queue ``tensorq-batch`` with ``Retry(max=3)``
and a job timeout; ``rq worker tensorq-batch`` runs them
(``producer.scoring.jobs.score_shard``), each writing ``D/part-00042.npy``
(``.safetensors`` for several outputs) atomically. The batch's parameters
and its job ids are kept in Redis:

    tq:batch:<id>        JSON BatchRecord (TTL: --ttl, default 7 days)
    tq:batch:<id>:jobs   list of RQ job ids, shard order (same TTL)

(built by ``common.keys.Keys``; the record is ``common.records.BatchRecord``).
The part files are the source of truth for completion: a shard whose part
exists is done, whatever its job says. rq is imported when a batch is
submitted or read, so the verbs register without the ``[batch]`` extra.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from common.backoff import Poll
from common.errors import UnknownModel
from common.keys import Keys
from common.records import BatchRecord
from common.settings import Settings
from common.spec import ModelSpec
from producer.scoring.errors import ScoringError
from producer.scoring.inputs import bind_inputs, open_inputs, split_input_spec
from producer.scoring.outputs import OutputLayout
from producer.scoring.runner import ScoreOptions

if TYPE_CHECKING:
    from rq.job import Job

QUEUE = "tensorq-batch"
# The RQ job function each shard runs, by import path (what RQ stores). A
# test may name a wrapper of it here (see tests/integration/test_scoring_pool.py).
JOB_FUNCTION = "producer.scoring.jobs.score_shard"
RETRIES = 3
DEFAULT_JOB_TIMEOUT_S = 3600
DEFAULT_TTL_S = 7 * 24 * 3600
_SETTLED = ("finished", "failed", "stopped", "canceled", "missing")


@dataclass(frozen=True)
class ShardStatus:
    shard: int
    start: int
    stop: int
    state: str  # an RQ job status, or "missing" (job expired and no part)
    rows_done: int
    retries: int  # attempts after the first
    failures: tuple[str, ...]  # one line per failed attempt
    part: str

    @property
    def settled(self) -> bool:
        return self.state in _SETTLED


@dataclass(frozen=True)
class BatchStatus:
    record: BatchRecord
    shards: tuple[ShardStatus, ...]

    @property
    def rows_done(self) -> int:
        return sum(s.rows_done for s in self.shards)

    @property
    def settled(self) -> bool:
        return all(s.settled for s in self.shards)

    @property
    def failed(self) -> list[ShardStatus]:
        return [s for s in self.shards if s.settled and s.state != "finished"]

    def to_json(self) -> dict[str, Any]:
        return {
            "batch": self.record.batch_id,
            "model": self.record.model,
            "rows": self.record.rows,
            "rows_done": self.rows_done,
            "states": dict(Counter(s.state for s in self.shards)),
            "shards": [asdict(s) for s in self.shards],
        }

    def table(self) -> str:
        r = self.record
        lines = [
            f"batch {r.batch_id}: model {r.model}, {r.rows:,} rows in {r.shards} shard(s) "
            f"of {r.shard_rows:,}, queue {QUEUE}, parts in {r.output_dir}",
            f"{'shard':>5}  {'rows':<19} {'state':<10} {'done':>6}  {'retries':>7}  last error",
        ]
        for s in self.shards:
            pct = 100.0 * s.rows_done / max(1, s.stop - s.start)
            note = s.failures[-1] if s.failures else ""
            lines.append(
                f"{s.shard:>5}  {f'{s.start}-{s.stop - 1}':<19} {s.state:<10} {pct:>5.1f}%  "
                f"{s.retries:>7}  {note}"
            )
        counts = ", ".join(
            f"{n} {state}" for state, n in sorted(Counter(x.state for x in self.shards).items())
        )
        lines.append(
            f"total  {self.rows_done:,}/{r.rows:,} rows ({100.0 * self.rows_done / r.rows:.1f}%); "
            f"{counts}"
        )
        return "\n".join(lines)


def submit_batch(
    connection: redis.Redis,
    settings: Settings,
    *,
    model: str,
    inputs: Sequence[str],
    output_dir: Path,
    shard_rows: int,
    options: ScoreOptions,
    job_timeout_s: int = DEFAULT_JOB_TIMEOUT_S,
    ttl_s: int = DEFAULT_TTL_S,
) -> BatchRecord:
    """Check everything, then record the batch and enqueue one job per shard."""
    from rq import Queue, Retry

    options.validate()
    if shard_rows < 1:
        raise ScoringError(f"--shard-rows must be >= 1, got {shard_rows}")
    if job_timeout_s < 1:
        raise ScoringError(f"--job-timeout must be >= 1, got {job_timeout_s}")
    specs = [_absolute(spec) for spec in inputs]
    spec = _served_spec(connection, settings, model)
    source = open_inputs(specs)
    try:
        bound = bind_inputs(
            source,
            spec,
            rows_per_request=options.rows_per_request,
            max_payload_bytes=settings.limits.max_payload_bytes,
        )
    finally:
        source.close()
    layout = OutputLayout.from_spec(spec, options.outputs or None, "safetensors")
    output_dir = output_dir.resolve()
    if output_dir.exists() and not output_dir.is_dir():
        raise ScoringError(f"{output_dir}: exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.glob("part-*")):
        raise ScoringError(f"{output_dir} already holds part files; use a new directory")
    output_dir.mkdir(parents=True, exist_ok=True)
    record = BatchRecord(
        batch_id=uuid.uuid4().hex[:12],
        model=spec.name,
        inputs=tuple(specs),
        output_dir=str(output_dir),
        rows=bound.rows,
        shard_rows=shard_rows,
        part_format="npy" if len(layout.fields) == 1 else "safetensors",
        outputs=tuple(f.name for f in layout.fields),
        options={
            "rows_per_request": bound.rows_per_request,
            "window": options.window,
            "on_error": options.on_error,
            "timeout_s": options.timeout_s,
            "retries": options.retries,
            "checkpoint_every_s": options.checkpoint_every_s,
        },
        job_timeout_s=job_timeout_s,
        prefix=settings.redis.prefix,
        created_ms=int(time.time() * 1000),
    )
    (output_dir / "batch.json").write_text(record.encode() + "\n")
    keys = Keys.of(settings.redis)
    job_ids = [record.job_id(i) for i in range(record.shards)]
    with connection.pipeline(transaction=True) as pipe:
        pipe.set(keys.batch(record.batch_id), record.encode(), ex=ttl_s)
        pipe.rpush(keys.batch_jobs(record.batch_id), *job_ids)
        pipe.expire(keys.batch_jobs(record.batch_id), ttl_s)
        pipe.execute()
    queue = Queue(QUEUE, connection=connection)
    datas = []
    for shard in range(record.shards):
        start, stop = record.shard_range(shard)
        datas.append(
            Queue.prepare_data(
                JOB_FUNCTION,
                kwargs={
                    "batch_id": record.batch_id,
                    "shard": shard,
                    "prefix": record.prefix,
                    "model": record.model,
                    "inputs": list(record.inputs),
                    "start": start,
                    "stop": stop,
                    "part": str(part_path(record, shard)),
                    "options": record.options | {"outputs": list(record.outputs)},
                },
                timeout=job_timeout_s,
                result_ttl=ttl_s,
                failure_ttl=ttl_s,
                description=f"tensorq score {record.model} rows {start}-{stop - 1} "
                f"(batch {record.batch_id} shard {shard})",
                job_id=job_ids[shard],
                meta={"rows": stop - start, "rows_done": 0, "failures": []},
                retry=Retry(max=RETRIES),
            )
        )
    with connection.pipeline() as pipe:
        queue.enqueue_many(datas, pipeline=pipe)
        pipe.execute()
    return record


def part_path(record: BatchRecord, shard: int) -> Path:
    return Path(record.output_dir) / record.part_name(shard)


def load_record(connection: redis.Redis, prefix: str, batch_id: str) -> BatchRecord:
    raw: Any = connection.get(Keys(prefix).batch(batch_id))
    if raw is None:
        raise ScoringError(f"no batch {batch_id!r} in Redis (expired, or never submitted)")
    return BatchRecord.decode(raw)


def batch_status(connection: redis.Redis, prefix: str, batch_id: str) -> BatchStatus:
    from rq.job import Job

    record = load_record(connection, prefix, batch_id)
    ids = [record.job_id(i) for i in range(record.shards)]
    jobs = Job.fetch_many(ids, connection=connection)
    shards = []
    for shard, job in enumerate(jobs):
        start, stop = record.shard_range(shard)
        part = part_path(record, shard)
        failures: tuple[str, ...] = ()
        retries = 0
        meta: dict[str, Any] = {}
        if job is not None:
            meta = dict(job.meta or {})
            failures = tuple(str(f) for f in meta.get("failures", []))
            if job.retries_left is not None:
                retries = RETRIES - job.retries_left
        if part.exists():
            state = "finished"
        elif job is None:
            state = "missing"
        else:
            state = str(job.get_status(refresh=False).value)
            if state == "failed" and not failures:
                failures = (_last_error(job),)
        done = stop - start if state == "finished" else int(meta.get("rows_done", 0))
        shards.append(ShardStatus(shard, start, stop, state, done, retries, failures, str(part)))
    return BatchStatus(record, tuple(shards))


def wait_batch(
    connection: redis.Redis,
    prefix: str,
    batch_id: str,
    *,
    poll_s: float = 0.5,
    timeout_s: float | None = None,
    progress: Callable[[BatchStatus], None] | None = None,
) -> BatchStatus:
    """Poll until every shard has finished or failed for good (RQ retries
    exhausted), at intervals growing to ``poll_s``."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    poll = Poll(first=min(0.05, poll_s), cap=poll_s)
    while True:
        status = batch_status(connection, prefix, batch_id)
        if progress is not None:
            progress(status)
        if status.settled:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise ScoringError(
                f"batch {batch_id}: not finished within {timeout_s}s "
                f"({status.rows_done:,}/{status.record.rows:,} rows)"
            )
        time.sleep(poll.next())  # polling job state in Redis, at growing intervals


def _served_spec(connection: redis.Redis, settings: Settings, model: str) -> ModelSpec:
    """The signature workers publish; the configured one if no worker is up yet."""
    raw: Any = connection.hget(Keys.of(settings.redis).models, model)
    if raw is not None:
        return ModelSpec.from_json(raw)
    for config in settings.models:
        if config.name == model:
            return config.spec()
    raise UnknownModel(f"no worker serves model {model!r} and the configuration lacks it")


def _absolute(spec: str) -> str:
    name, path = split_input_spec(spec)
    return f"{name}={path.resolve()}" if name else str(path.resolve())


def _last_error(job: Job) -> str:
    result = job.latest_result()
    text = (result.exc_string or "") if result is not None else ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "failed"
