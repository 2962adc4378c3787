"""``tensorq score``: score one file against a running pool, or a private one.

With a Redis URL (``--redis``, ``TQ_REDIS_URL`` or the config) the rows go to
the pool behind it. Without one, ``score`` is self-contained, like ``tensorq
demo``: it starts a private redis-server and a worker pool on ``--devices``,
scores, and stops both. Resume works either way: the checkpoint lives in
files next to the output, not in Redis.

Every check that needs no pool (flags, output files, the input files
against the model's configured signature) runs before anything is started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from common.errors import TensorQError
from common.settings import Settings
from producer.scoring.checkpoint import ScorePaths
from producer.scoring.inputs import InputSource, bind_inputs, open_inputs
from producer.scoring.runner import (
    DEFAULT_WINDOW,
    ON_ERROR,
    ScoreOptions,
    ScoreSummary,
    check_output_policy,
    score_file,
)


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model name (as served by the pool)")
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="FILE",
        help="FILE.npy | NAME=FILE.npy (repeatable) | FILE.npz | FILE.safetensors; rows on axis 0",
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="FILE.npy (one output) or FILE.safetensors"
    )
    add_run_arguments(parser)
    parser.add_argument(
        "--errors-file", type=Path, default=None, help="default: OUTPUT.errors.jsonl"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace output and checkpoint")
    parser.add_argument(
        "--checkpoint-every",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how often progress is made durable (default 2; 0 = after every chunk)",
    )
    parser.add_argument(
        "--devices", default=None, help="devices of the private pool when no Redis URL is set"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``score`` and ``batch submit``."""
    parser.add_argument(
        "--rows-per-request",
        type=int,
        default=None,
        metavar="N",
        help="rows per request (default: the model's max_batch_size)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        metavar="N",
        help=f"requests in flight (default {DEFAULT_WINDOW})",
    )
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="stop",
        help="stop: a failed chunk ends the run; skip: fill its rows (NaN/0) and list them",
    )
    parser.add_argument(
        "--outputs",
        default="",
        metavar="NAMES",
        help="comma-separated outputs to store (default: all; .npy holds one)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="per request; a request past it is resent (default 300)",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="resends of a timed-out request (default 2)"
    )


def options_from_args(args: argparse.Namespace) -> ScoreOptions:
    options = ScoreOptions(
        rows_per_request=args.rows_per_request,
        window=args.window,
        on_error=args.on_error,
        timeout_s=args.timeout,
        retries=args.retries,
        checkpoint_every_s=getattr(args, "checkpoint_every", 2.0),
        resume=getattr(args, "resume", False),
        overwrite=getattr(args, "overwrite", False),
        outputs=tuple(n.strip() for n in args.outputs.split(",") if n.strip()),
        errors_file=getattr(args, "errors_file", None),
    )
    options.validate()
    return options


def run_score(args: argparse.Namespace, settings: Settings) -> int:
    options = options_from_args(args)
    paths = ScorePaths.for_output(args.output, options.errors_file)
    check_output_policy(paths, options)  # before any pool is started
    source = open_inputs(args.input)
    try:
        _precheck(source, settings, args.model, options)
        if settings.redis.url:
            return _score_with(settings.redis.url, settings, source, args, options)
        from producer.ops.stack import ensure_example_models, local_stack

        if not settings.models:
            print("tensorq score: no Redis URL and no [[models]] configured", file=sys.stderr)
            return 2
        settings.model(args.model)  # ConfigError if the private pool would not serve it
        ensure_example_models(settings)
        if not args.no_progress:
            print("starting a private redis-server and worker pool", file=sys.stderr, flush=True)
        with local_stack(settings, devices=args.devices) as stack:
            return _score_with(stack.redis_url, settings, source, args, options)
    finally:
        source.close()


def _precheck(source: InputSource, settings: Settings, model: str, options: ScoreOptions) -> None:
    """Check the inputs against the configured signature, if this config has
    the model (the served signature is checked again before enqueueing)."""
    for config in settings.models:
        if config.name == model:
            bind_inputs(source, config.spec(), rows_per_request=options.rows_per_request)


def _score_with(
    url: str,
    settings: Settings,
    source: InputSource,
    args: argparse.Namespace,
    options: ScoreOptions,
) -> int:
    bar = _Bar(enabled=not args.no_progress, label=args.model)
    try:
        summary = asyncio.run(_score(url, settings, source, args, options, bar))
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        bar.close()
        checkpoint = ScorePaths.for_output(args.output).checkpoint
        print(
            f"tensorq score: interrupted; progress is saved in {checkpoint}: "
            "rerun with --resume to continue",
            file=sys.stderr,
        )
        return 130 if isinstance(exc, KeyboardInterrupt) else 128 + signal.SIGTERM
    except TensorQError as exc:
        bar.close()
        checkpoint = ScorePaths.for_output(args.output).checkpoint
        if not checkpoint.exists():
            raise
        print(
            f"tensorq score: {exc}; progress is saved in {checkpoint}: "
            "rerun with --resume once the cause is fixed",
            file=sys.stderr,
        )
        return 2
    finally:
        bar.close()
    if args.json:
        print(json.dumps(summary.to_json() | {"peak_rss_mb": round(peak_rss_mb(), 1)}), flush=True)
    else:
        print(summary.line(), flush=True)
    return 0


def peak_rss_mb() -> float:
    """This process's own peak resident set. ``VmHWM`` where Linux has it:
    ``getrusage`` also counts the pages a process had before its exec (a
    fork of a big parent looks big), so it overstates a child's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _score(
    url: str,
    settings: Settings,
    source: InputSource,
    args: argparse.Namespace,
    options: ScoreOptions,
    bar: _Bar,
) -> ScoreSummary:
    from producer.client import AsyncClient

    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:  # SIGTERM stops like Ctrl-C: checkpoint saved
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        async with AsyncClient(url, settings=settings) as client:
            return await score_file(
                client,
                model=args.model,
                source=source,
                output=args.output,
                options=options,
                progress=bar.update,
            )
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


class _Bar:
    """A tqdm bar on stderr: rows/s and ETA; resumed rows do not count as speed."""

    def __init__(self, *, enabled: bool, label: str) -> None:
        self._enabled = enabled
        self._label = label
        self._bar: Any = None

    def update(self, done: int, total: int) -> None:
        if not self._enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=done,
                unit="row",
                unit_scale=True,
                desc=self._label,
                file=sys.stderr,
                dynamic_ncols=True,
                smoothing=0.1,
            )
            return
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
