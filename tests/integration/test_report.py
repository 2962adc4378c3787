"""The benchmark report's parts: open-loop offered load, and the PNG/CSV."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from producer import AsyncClient
from producer.bench.loadgen import random_inputs, run_rate
from producer.bench.report import _plot
from tests.conftest import PoolHandle, write_config


async def test_offered_load_is_paced_and_answered(
    tmp_path: Path, models_dir: Path, redis_url: str, start_pool: Callable[..., PoolHandle]
) -> None:
    start_pool(write_config(tmp_path / "t.toml", models_dir), redis_url, devices="cpu", workers=1)
    rng = np.random.default_rng(0)
    async with AsyncClient(redis_url) as client:
        spec = await client.spec("mlp")
        report = await run_rate(
            client, "mlp", lambda i: random_inputs(spec.inputs, 1, rng), rate=200, seconds=1.0
        )
    assert report.requests == 200 and report.errors == 0
    assert report.seconds >= 0.99  # the sends were spread over the second, not burst
    assert 0 < report.p50_ms <= report.p99_ms


def test_plot_writes_a_png(tmp_path: Path) -> None:
    rows = [
        {"policy": p, "offered_rps": r, "achieved_items_per_s": r, "p50_ms": 1.0, "p99_ms": 2.0,
         "mean_batch_rows": 1.0}
        for p in ("fixed", "adaptive")
        for r in (100.0, 200.0)
    ]  # fmt: skip
    _plot(rows, tmp_path / "bench.png", "mlp")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
