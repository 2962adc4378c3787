"""``tensorq bench-score``: ``tensorq score`` against references measured in
the same run on the same machine, printed as ratios.

- CNN (compute-bound): rows/s of ``tensorq score`` over a file, against the
  model called in-process over the same rows in batches of the same size,
  with the same thread count and malloc settings as the worker (target >= 0.85).
  The reference runs just before and just after the score run and their mean
  is used, so drifting machine load weighs on both sides alike.
- MLP (light, so moving bytes dominates): rows/s against the bare Redis
  round trip for payloads of the same size (``producer.bench.reference``).
- Memory: the scoring process's peak RSS (``wait4``) for files from a few
  hundred KB to several hundred times the in-flight window.

Each ``tensorq score`` runs as its own process against one local stack
(private redis-server + a ``tensorq worker`` pool on ``--devices``), and the
in-process reference as its own process too (``producer.bench.scoring_reference``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from common import aio
from common.envelope import Request, pack_request
from common.runtime_env import MALLOC_ENV
from common.settings import ModelConfig, Settings
from producer.bench.reference import bare_transport
from producer.ops.stack import ensure_example_models, expected_workers, local_stack, tensorq_command
from producer.scoring.errors import ScoringError
from producer.scoring.formats import npy_header


def run_bench_score(args: argparse.Namespace, settings: Settings) -> int:
    settings = settings.replace(worker=replace(settings.worker, threads=args.threads))
    ensure_example_models(settings)
    cnn, mlp = settings.model("cnn"), settings.model("mlp")
    slots = expected_workers(args.devices) or 1
    env = {**MALLOC_ENV, "TQ_WORKER_THREADS": str(args.threads)}
    print(
        f"tensorq bench-score: {slots} worker(s) x {args.threads} thread(s) on {args.devices}, "
        f"window {args.window}",
        flush=True,
    )
    figures: dict[str, Any] = {"window": args.window, "threads": args.threads, "slots": slots}
    with tempfile.TemporaryDirectory(prefix="tensorq-bench-score-", dir=args.workdir) as tmp:
        work = Path(tmp)
        files = {
            "warmup": _random_file(work / "warmup.npy", cnn, 512),
            "cnn": _random_file(work / "cnn.npy", cnn, args.rows),
            "mlp_small": _random_file(work / "mlp-small.npy", mlp, max(1, args.mlp_rows // 10)),
            "mlp": _random_file(work / "mlp.npy", mlp, args.mlp_rows),
        }
        with local_stack(settings, devices=args.devices, extra_env=env) as stack:
            url = stack.redis_url
            runs = {"warmup": _score_child(url, settings, cnn, files["warmup"], args.window)}
            # The reference brackets the score run (the pool idle meanwhile), so a
            # change in machine load during the run weighs on both sides alike.
            before = _reference(cnn, files["cnn"], cnn.max_batch_size, args.threads, slots)
            runs["cnn"] = _score_child(url, settings, cnn, files["cnn"], args.window)
            after = _reference(cnn, files["cnn"], cnn.max_batch_size, args.threads, slots)
            for name in ("mlp_small", "mlp"):
                runs[name] = _score_child(url, settings, mlp, files[name], args.window)
            mlp_rows = mlp.max_batch_size
            request = Request(
                "x" * 28,
                mlp.name,
                {"x": np.zeros((mlp_rows, *mlp.inputs[0].shape), np.float32)},
                reply_to="tq:inbox:" + "x" * 16,
            )
            payload = len(pack_request(request))
            chunks = -(-args.mlp_rows // mlp_rows)
            bare_payloads = aio.run(bare_transport(url, payload, chunks))
            mlp_reference = _reference(mlp, files["mlp"], mlp_rows, args.threads, slots)
    figures |= {
        "runs": runs,
        "inprocess_rows_per_s": (before + after) / 2,
        "inprocess_before_after": [before, after],
        "mlp_inprocess_rows_per_s": mlp_reference,
        "bare_rows_per_s": bare_payloads * mlp_rows,
        "payload_bytes": payload,
    }
    _report(figures)
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


def _random_file(path: Path, model: ModelConfig, rows: int) -> Path:
    """A float32 .npy of random rows for a one-input model, written block by
    block with plain writes (so this process stays small)."""
    (tensor,) = model.inputs
    rng = np.random.default_rng(0)
    with path.open("wb") as fp:
        fp.write(npy_header(np.dtype("<f4"), (rows, *tensor.shape)))
        for start in range(0, rows, 4096):
            block = (min(4096, rows - start), *tensor.shape)
            fp.write(rng.standard_normal(block, dtype=np.float32).tobytes())
    return path


def _score_child(
    url: str, settings: Settings, model: ModelConfig, path: Path, window: int
) -> dict[str, Any]:
    """Run ``tensorq score`` as a process; its summary plus its peak RSS."""
    config = ["--config", str(settings.config_path)] if settings.config_path else []
    output = path.with_name(path.stem + "-out.npy")
    cmd = tensorq_command(
        "--log-level", "warning", "score", "--redis", url, *config, "--model", model.name,
        "--input", str(path), "--output", str(output), "--window", str(window),
        "--no-progress", "--json", "--overwrite",
    )  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    out = b""
    if proc.stdout is not None:
        out = proc.stdout.read()
        proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise ScoringError(f"tensorq score exited with {proc.returncode} on {path}")
    summary: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    tensor = model.inputs[0]
    row_bytes = int(np.prod(tensor.shape)) * 4
    per_request = model.max_batch_size
    summary |= {  # peak_rss_mb: the child's own VmHWM (see producer.scoring.score)
        "file_mb": path.stat().st_size / 1e6,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "rows_per_request": per_request,
        "window_mb": window * per_request * row_bytes / 1e6,
    }
    output.unlink(missing_ok=True)
    return summary


def _reference(model: ModelConfig, path: Path, batch: int, threads: int, slots: int) -> float:
    """Rows/s of the model called in-process over the file: one process per
    worker slot, run at the same time, summed (as ``tensorq bench`` does)."""
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(threads)}
    cmd = [
        sys.executable, "-m", "producer.bench.scoring_reference", "--model", str(model.path),
        "--input", str(path), "--batch", str(batch), "--threads", str(threads),
    ]  # fmt: skip
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE) for _ in range(slots)]
    total = 0.0
    for proc in procs:
        out, _ = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise ScoringError(f"the in-process reference exited with {proc.returncode}")
        total += float(json.loads(out)["rows_per_s"])
    return total


def _report(f: dict[str, Any]) -> None:
    runs = f["runs"]
    cnn, mlp = runs["cnn"], runs["mlp"]
    ratio_a = cnn["rows_per_s"] / f["inprocess_rows_per_s"]
    ratio_b = mlp["rows_per_s"] / f["bare_rows_per_s"]
    print(
        f"  cnn {cnn['rows']:>9,} rows ({cnn['file_mb']:.0f} MB)  tensorq score "
        f"{cnn['rows_per_s']:>9,.0f} rows/s\n"
        f"      (a) model in-process, batch {cnn['rows_per_request']}, same threads "
        f"{f['inprocess_rows_per_s']:>9,.0f} rows/s   score/in-process = {ratio_a:.2f}"
        f"   (before/after: {f['inprocess_before_after'][0]:,.0f}/"
        f"{f['inprocess_before_after'][1]:,.0f})\n"
        f"  mlp {mlp['rows']:>9,} rows ({mlp['file_mb']:.0f} MB)  tensorq score "
        f"{mlp['rows_per_s']:>9,.0f} rows/s\n"
        f"      (b) bare Redis round trip, {f['payload_bytes']:,} B payloads of "
        f"{mlp['rows_per_request']} rows {f['bare_rows_per_s']:>9,.0f} rows/s   "
        f"score/bare = {ratio_b:.2f}\n"
        f"      (for scale) model in-process, batch {mlp['rows_per_request']}, same threads "
        f"{f['mlp_inprocess_rows_per_s']:>9,.0f} rows/s   "
        f"score/in-process = {mlp['rows_per_s'] / f['mlp_inprocess_rows_per_s']:.2f}\n"
        "  the scoring process (window = in-flight request bytes):",
        flush=True,
    )
    for name, run in runs.items():
        busy = 100.0 * run["cpu_s"] / max(run["seconds"], 1e-9)
        print(
            f"      {name:<9} {run['rows']:>9,} rows, file {run['file_mb']:>6.1f} MB, "
            f"window {run['window_mb']:>4.1f} MB: peak RSS {run['peak_rss_mb']:>6.1f} MB, "
            f"CPU {run['cpu_s']:.1f}s ({busy:.0f}% of its run incl. start-up)",
            flush=True,
        )
    f["ratio_inprocess"] = ratio_a
    f["ratio_bare"] = ratio_b
