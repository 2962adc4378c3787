"""The streaming scoring engine, shared by ``tensorq score`` and the RQ shard jobs.

Rows are sent in chunks of ``rows_per_request`` on a fixed grid, with at
most ``window`` requests in flight (all free slots refilled in one pipelined
``submit_many``). Each result is written at its rows' place in the output, so
the file is in input order whatever order results arrive in. Progress is
checkpointed every ``checkpoint_every_s`` seconds and on any interruption;
a resumed run sends only the chunks still missing.

A chunk that times out or comes back expired/cancelled is resent up to
``retries`` times. One the pool rejects (``model_error``, ``invalid_input``
...) stops the run under ``on_error="stop"``, naming its rows; under
``"skip"`` its rows are filled (NaN, or zero for integer outputs) and listed
in the errors file (JSON Lines, one object per failed chunk).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.backoff import Poll
from common.envelope import Result
from common.errors import InferenceError, QueueFull, RequestTimeout, TensorQError
from producer.client import AsyncClient, Submission, outputs_of
from producer.scoring.checkpoint import Checkpoint, Failure, ScorePaths
from producer.scoring.errors import ChunkFailed, ScoringError
from producer.scoring.inputs import BoundInputs, InputSource, bind_inputs
from producer.scoring.outputs import (
    OutputFile,
    OutputLayout,
    commit,
    output_format,
    write_jsonl_atomic,
)
from producer.scoring.ranges import chunk_grid, describe_rows

log = logging.getLogger(__name__)

ON_ERROR = ("stop", "skip")
SUBMIT_BYTES = 8 * 1024 * 1024  # input bytes encoded and sent per round trip, at most
# Requests in flight: enough to keep a pool busy with a light model, where
# per-request overhead dominates; memory does not grow with it (SUBMIT_BYTES).
DEFAULT_WINDOW = 64
# (rows done in the range so far, rows in the range); called once at the start.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ScoreOptions:
    """How a run sends requests and treats failures and existing files."""

    rows_per_request: int | None = None  # None: the model's max_batch_size
    window: int = DEFAULT_WINDOW  # requests in flight
    on_error: str = "stop"  # stop | skip
    timeout_s: float = 300.0  # per request, from submission
    retries: int = 2  # resends of a chunk that timed out or expired
    checkpoint_every_s: float = 2.0  # 0: after every chunk
    resume: bool = False
    overwrite: bool = False
    outputs: tuple[str, ...] = ()  # output names to store; () = all
    errors_file: Path | None = None  # default: <output>.errors.jsonl

    def validate(self) -> None:
        if self.window < 1:
            raise ScoringError(f"--window must be >= 1, got {self.window}")
        if self.on_error not in ON_ERROR:
            raise ScoringError(f"--on-error must be stop or skip, got {self.on_error!r}")
        if self.timeout_s <= 0:
            raise ScoringError(f"--timeout must be > 0, got {self.timeout_s}")
        if self.retries < 0:
            raise ScoringError(f"--retries must be >= 0, got {self.retries}")
        if self.checkpoint_every_s < 0:
            raise ScoringError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every_s}")


@dataclass(frozen=True)
class ScoreSummary:
    model: str
    output: Path
    rows: int  # rows in the scored range
    scored_rows: int  # rows this run sent and got back (or failed)
    resumed_rows: int  # rows a checkpoint already held
    failed_rows: int  # rows filled because their chunk failed (all runs)
    failed_chunks: int
    seconds: float
    errors_file: Path | None
    already_complete: bool = False

    @property
    def rows_per_s(self) -> float:
        return self.scored_rows / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        if self.already_complete:
            return f"{self.output} is already complete ({self.rows:,} rows); nothing to do"
        text = (
            f"scored {self.scored_rows:,} rows with {self.model} in {self.seconds:.1f}s "
            f"({self.rows_per_s:,.0f} rows/s); errors: {self.failed_rows:,} rows "
            f"in {self.failed_chunks} chunk(s) -> {self.output}"
        )
        if self.resumed_rows:
            text += f" ({self.resumed_rows:,} rows resumed from the checkpoint)"
        if self.errors_file is not None:
            text += f"; failed rows listed in {self.errors_file}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "output": str(self.output),
            "rows": self.rows,
            "scored_rows": self.scored_rows,
            "resumed_rows": self.resumed_rows,
            "failed_rows": self.failed_rows,
            "failed_chunks": self.failed_chunks,
            "seconds": round(self.seconds, 4),
            "rows_per_s": round(self.rows_per_s, 1),
            "errors_file": str(self.errors_file) if self.errors_file else None,
            "already_complete": self.already_complete,
        }


def check_output_policy(paths: ScorePaths, options: ScoreOptions) -> str:
    """``fresh``, ``resume`` or ``complete``, or ScoringError when the files on
    disk and the flags disagree. Touches nothing; callable before any work."""
    output_format(paths.output)
    if not paths.output.parent.is_dir():
        raise ScoringError(f"{paths.output.parent}: output directory does not exist")
    if paths.checkpoint.exists():
        if options.resume:
            return "resume"
        if options.overwrite:
            return "fresh"
        raise ScoringError(
            f"{paths.checkpoint} holds an interrupted run: continue it with --resume, "
            "or start over with --overwrite"
        )
    if paths.output.exists():
        if options.resume:
            return "complete"
        if options.overwrite:
            return "fresh"
        raise ScoringError(f"{paths.output} already exists (--overwrite replaces it)")
    return "fresh"


async def score_file(
    client: AsyncClient,
    *,
    model: str,
    source: InputSource,
    output: Path,
    options: ScoreOptions | None = None,
    rows: tuple[int, int] | None = None,
    progress: Progress | None = None,
) -> ScoreSummary:
    """Score rows ``[start, stop)`` of ``source`` (all by default) into ``output``.

    Every check (flags, files on disk, inputs against the served model) runs
    before the first request is enqueued.
    """
    options = options or ScoreOptions()
    options.validate()
    paths = ScorePaths.for_output(output, options.errors_file)
    fmt = output_format(output)
    mode = check_output_policy(paths, options)
    spec = await client.spec(model)
    checkpoint = Checkpoint.load(paths.checkpoint) if mode == "resume" else None
    per_request = options.rows_per_request
    if per_request is None and checkpoint is not None:
        per_request = checkpoint.identity.get("rows_per_request")
    bound = bind_inputs(
        source,
        spec,
        rows_per_request=per_request,
        max_payload_bytes=client.settings.limits.max_payload_bytes,
    )
    start, stop = rows if rows is not None else (0, bound.rows)
    if not 0 <= start < stop <= bound.rows:
        raise ScoringError(f"row range {start}-{stop} is outside the input's {bound.rows} rows")
    if mode == "complete":
        return ScoreSummary(model, output, stop - start, 0, 0, 0, 0, 0.0, None, True)
    layout = OutputLayout.from_spec(spec, options.outputs or None, fmt)
    identity = {
        "model": spec.name,
        "model_version": spec.version,
        "inputs": source.fingerprint(),
        "rows": [start, stop],
        "output": str(output.resolve()),
        "format": fmt,
        "outputs": [f.name for f in layout.fields],
        "rows_per_request": bound.rows_per_request,
    }
    if checkpoint is not None:
        different = checkpoint.mismatch(identity)
        if different:
            raise ScoringError(
                f"{paths.checkpoint} belongs to a different run ({different}); "
                "start over with --overwrite"
            )
        finished = not checkpoint.done.gaps(start, stop) and not paths.partial.exists()
        if finished and paths.output.exists():  # interrupted while cleaning up
            paths.checkpoint.unlink()
            return ScoreSummary(model, output, stop - start, 0, 0, 0, 0, 0.0, None, True)
    else:
        for stale in (paths.partial, paths.checkpoint):
            stale.unlink(missing_ok=True)
        checkpoint = Checkpoint(identity)
    engine = _Engine(
        client, bound, (start, stop), fmt, layout, checkpoint, paths, options, progress
    )
    return await engine.run()


@dataclass
class _Chunk:
    start: int
    stop: int
    attempt: int = 0
    request_id: str = ""


class _Engine:
    def __init__(
        self,
        client: AsyncClient,
        bound: BoundInputs,
        row_range: tuple[int, int],
        fmt: str,
        layout: OutputLayout,
        checkpoint: Checkpoint,
        paths: ScorePaths,
        options: ScoreOptions,
        progress: Progress | None,
    ) -> None:
        self.client = client
        self.bound = bound
        self.start, self.stop = row_range
        self.fmt = fmt
        self.layout = checkpoint.layout or layout
        self.state = checkpoint
        self.paths = paths
        self.options = options
        self.progress = progress
        self.writer: OutputFile | None = None
        self.resumed_rows = checkpoint.done.total()
        self.scored_rows = 0
        self.inflight: dict[asyncio.Task[Result], _Chunk] = {}
        self.pending: deque[_Chunk] = deque()
        self._dirty = False

    @property
    def rows(self) -> int:
        return self.stop - self.start

    async def run(self) -> ScoreSummary:
        self._open_writer()
        gaps = self.state.done.gaps(self.start, self.stop)
        size = self.bound.rows_per_request
        self.pending.extend(_Chunk(a, b) for a, b in chunk_grid(gaps, origin=self.start, size=size))
        self._report()
        began = time.perf_counter()
        last_save = time.monotonic()
        idle = Poll(first=0.01, cap=2.0)  # waiting for room in a full queue
        try:
            while self.pending or self.inflight:
                refused = await self._fill_window()
                if not self.inflight:  # the queue refused everything: back off
                    await idle.sleep()
                    continue
                if not refused:
                    idle.reset()
                done, _ = await asyncio.wait(self.inflight, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=lambda t: self.inflight[t].start):
                    self._settle(self.inflight.pop(task), task)
                self._report()
                if time.monotonic() - last_save >= self.options.checkpoint_every_s:
                    self._save()
                    last_save = time.monotonic()
            seconds = time.perf_counter() - began
            return self._finish(seconds)
        except BaseException:
            await self._abandon()
            raise
        finally:
            if self.writer is not None:
                self.writer.close()

    # -- sending ----------------------------------------------------------------

    async def _fill_window(self) -> bool:
        """Submit chunks into every free slot, up to ``SUBMIT_BYTES`` of input
        per pipelined round trip (so the copies made while encoding and
        sending stay small whatever the window). True if the queue refused
        some (they go back to the front of the line)."""
        while self.pending and len(self.inflight) < self.options.window:
            batch = [self.pending.popleft()]
            size = (batch[0].stop - batch[0].start) * self.bound.row_bytes
            room = self.options.window - len(self.inflight)
            while self.pending and len(batch) < room:
                more = (self.pending[0].stop - self.pending[0].start) * self.bound.row_bytes
                if size + more > SUBMIT_BYTES:
                    break
                batch.append(self.pending.popleft())
                size += more
            if await self._submit(batch):
                return True
        return False

    async def _submit(self, batch: list[_Chunk]) -> bool:
        model = self.bound.spec.name
        for chunk in batch:
            chunk.request_id = f"{self.client.client_id}-{chunk.start}-{chunk.attempt}"
        submissions = [
            Submission(
                model, self.bound.chunk(c.start, c.stop), request_id=c.request_id, store=False
            )
            for c in batch
        ]
        refused: set[str] = set()
        try:
            await self.client.submit_many(submissions)
        except QueueFull as exc:
            refused = set(exc.refused)
        del submissions
        for chunk in batch:
            if chunk.request_id in refused:
                continue
            task = asyncio.create_task(self.client.wait(chunk.request_id, self.options.timeout_s))
            self.inflight[task] = chunk
            self.bound.release(chunk.start, chunk.stop)  # sent: its pages can go
        self.pending.extendleft(reversed([c for c in batch if c.request_id in refused]))
        return bool(refused)

    # -- receiving --------------------------------------------------------------

    def _settle(self, chunk: _Chunk, task: asyncio.Task[Result]) -> None:
        try:
            outputs = outputs_of(task.result())
        except (RequestTimeout, InferenceError) as exc:
            transient = isinstance(exc, RequestTimeout) or exc.code in ("expired", "cancelled")
            if transient and chunk.attempt < self.options.retries:
                log.warning(
                    "%s: %s; resending (attempt %d)",
                    describe_rows(chunk.start, chunk.stop),
                    exc,
                    chunk.attempt + 2,
                )
                self.pending.appendleft(_Chunk(chunk.start, chunk.stop, chunk.attempt + 1))
                return
            self._failed(chunk, exc.code, exc.message)
            return
        if not self.layout.resolved:
            self.layout = self.layout.resolve(outputs)
        checked = self.layout.check(outputs, chunk.stop - chunk.start)
        if isinstance(checked, str):
            self._failed(chunk, "bad_output", checked)
            return
        writer = self._open_writer()
        if writer is None:
            raise ScoringError("internal: no output file for a resolved layout")
        writer.write(chunk.start - self.start, checked)
        self._done(chunk)

    def _failed(self, chunk: _Chunk, code: str, message: str) -> None:
        where = describe_rows(chunk.start, chunk.stop)
        if self.options.on_error == "stop":
            raise ChunkFailed(
                f"{where} failed: {code}: {_one_line(message)} "
                "(--on-error skip fills them and carries on)",
                start=chunk.start,
                stop=chunk.stop,
                error_code=code,
                request_id=chunk.request_id,
            )
        log.warning("%s failed (%s: %s); filled and skipped", where, code, _one_line(message))
        self.state.failures.append(
            Failure(chunk.start, chunk.stop, code, message, chunk.request_id)
        )
        if self.writer is not None:
            self.writer.fill(chunk.start - self.start, chunk.stop - chunk.start)
        self._done(chunk)

    def _done(self, chunk: _Chunk) -> None:
        self.state.done.add(chunk.start, chunk.stop)
        self.scored_rows += chunk.stop - chunk.start
        self._dirty = True

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.state.done.total(), self.rows)

    # -- files ------------------------------------------------------------------

    def _open_writer(self) -> OutputFile | None:
        """The output file, created (or reopened on resume) once its layout is known."""
        if self.writer is not None or not self.layout.resolved:
            return self.writer
        if self.state.layout is not None:  # a resumed run whose file was already made
            if not self.paths.partial.exists():
                raise ScoringError(
                    f"{self.paths.partial} is missing but {self.paths.checkpoint} counts rows "
                    "in it; start over with --overwrite"
                )
            self.writer = OutputFile.reopen(self.paths.partial, self.fmt, self.layout, self.rows)
        else:
            self.writer = OutputFile.create(self.paths.partial, self.fmt, self.layout, self.rows)
            for failure in self.state.failures:  # chunks that failed before any result
                self.writer.fill(failure.start - self.start, failure.stop - failure.start)
        self.state.layout = self.layout
        return self.writer

    def _save(self) -> None:
        """Sync the output, then record what it holds (before any result is
        in, the writer may not exist yet: only skipped chunks are recorded)."""
        if not self._dirty:
            return
        if self.writer is not None:
            self.writer.sync()
        self.state.save(self.paths.checkpoint)
        self._dirty = False

    def _finish(self, seconds: float) -> ScoreSummary:
        failed_rows = sum(f.stop - f.start for f in self.state.failures)
        errors_file = None
        if self.state.failures:
            write_jsonl_atomic(self.paths.errors, [f.to_json() for f in self.state.failures])
            errors_file = self.paths.errors
        else:
            self.paths.errors.unlink(missing_ok=True)  # a stale one from an earlier run
        if self.writer is None:
            self._save()
            raise ScoringError(
                f"every chunk failed, so the shape of the outputs is unknown and "
                f"{self.paths.output} was not written; see {self.paths.errors}"
            )
        self.writer.sync()
        self.writer.close()
        commit(self.paths.partial, self.paths.output)
        self.paths.checkpoint.unlink(missing_ok=True)
        return ScoreSummary(
            model=self.bound.spec.name,
            output=self.paths.output,
            rows=self.rows,
            scored_rows=self.scored_rows,
            resumed_rows=self.resumed_rows,
            failed_rows=failed_rows,
            failed_chunks=len(self.state.failures),
            seconds=seconds,
            errors_file=errors_file,
        )

    async def _abandon(self) -> None:
        """Interrupted or failed: stop waiting, tell workers to skip what they
        have not started, and save what is finished."""
        tasks = list(self.inflight)
        ids = [c.request_id for c in self.inflight.values()]
        self.inflight.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(TensorQError, TimeoutError, OSError):
            await asyncio.wait_for(
                asyncio.gather(*(self.client.cancel(i) for i in ids)), timeout=2.0
            )
        self._save()


def _one_line(message: str) -> str:
    """The last line of a multi-line error (a TorchScript traceback ends with its reason)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"
