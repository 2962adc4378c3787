"""``tensorq bench --report DIR``: sweep offered load for the fixed and the
adaptive batch window, and write the figures as CSV and a PNG of throughput
and p50/p99 latency against offered load (matplotlib, headless)."""

from __future__ import annotations

import argparse
import csv
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from common.aio import run
from common.runtime_env import MALLOC_ENV
from common.settings import Settings
from producer.bench.loadgen import random_inputs, run_rate
from producer.client import AsyncClient
from producer.ops.stack import ensure_example_models, local_stack

POLICIES = ("fixed", "adaptive")
FIELDS = ("policy", "offered_rps", "achieved_items_per_s", "p50_ms", "p99_ms", "mean_batch_rows")


def run_report(args: argparse.Namespace, settings: Settings) -> int:
    directory = Path(args.report)
    directory.mkdir(parents=True, exist_ok=True)
    settings = settings.replace(worker=replace(settings.worker, threads=args.threads))
    ensure_example_models(settings)
    rates = [float(r) for r in args.rates.split(",")]
    rows: list[dict[str, Any]] = []
    for policy in POLICIES:
        env = {
            **MALLOC_ENV,
            "TQ_WORKER_THREADS": str(args.threads),
            "TQ_WORKER_BATCH_POLICY": policy,
        }
        with local_stack(settings, devices=args.devices, extra_env=env) as stack:
            rows += run(_sweep(stack.redis_url, settings, args, policy, rates))
    csv_path = directory / "bench.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    png_path = directory / "bench.png"
    _plot(rows, png_path, args.model)
    print(f"wrote {csv_path} and {png_path}")
    return 0


async def _sweep(
    url: str, settings: Settings, args: argparse.Namespace, policy: str, rates: list[float]
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    results = []
    async with AsyncClient(url, settings=settings) as client:
        spec = await client.spec(args.model)
        await run_rate(
            client,
            args.model,
            lambda i: random_inputs(spec.inputs, args.rows, rng),
            rate=min(rates),
            seconds=1.0,
        )  # fmt: skip  (warm-up)
        for rate in rates:
            report = await run_rate(
                client,
                args.model,
                lambda i: random_inputs(spec.inputs, args.rows, rng),
                rate=rate,
                seconds=args.seconds,
            )
            row = {
                "policy": policy,
                "offered_rps": rate,
                "achieved_items_per_s": round(report.items_per_s, 1),
                "p50_ms": round(report.p50_ms, 2),
                "p99_ms": round(report.p99_ms, 2),
                "mean_batch_rows": round(report.mean_batch_rows, 1),
            }
            print(
                f"  {policy:>8} offered {rate:>8.0f}/s: {row['achieved_items_per_s']:>9,.0f} "
                f"items/s  p50 {row['p50_ms']:>7.2f} ms  p99 {row['p99_ms']:>7.2f} ms  "
                f"batch {row['mean_batch_rows']:.1f}",
                flush=True,
            )
            results.append(row)
    return results


def _plot(rows: list[dict[str, Any]], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy in POLICIES:
        mine = [r for r in rows if r["policy"] == policy]
        offered = [r["offered_rps"] for r in mine]
        left.plot(offered, [r["achieved_items_per_s"] for r in mine], marker="o", label=policy)
        right.plot(offered, [r["p50_ms"] for r in mine], marker="o", label=f"{policy} p50")
        right.plot(
            offered, [r["p99_ms"] for r in mine], marker="x", linestyle="--", label=f"{policy} p99"
        )
    left.set(xlabel="offered load (requests/s)", ylabel="items/s", title=f"{model}: throughput")
    right.set(xlabel="offered load (requests/s)", ylabel="ms", title=f"{model}: latency")
    right.set_yscale("log")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
