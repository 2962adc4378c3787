"""Structured logs: one JSON object per line from every process of the pool,
lifecycle events at INFO and nothing per request."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from producer import Client
from tests.conftest import PoolHandle, write_config


def test_json_logs_cover_the_lifecycle_and_not_each_request(
    tmp_path: Path, models_dir: Path, redis_url: str, start_pool: Callable[..., PoolHandle]
) -> None:
    config = write_config(tmp_path / "t.toml", models_dir)
    pool = start_pool(config, redis_url, devices="cpu", workers=1, log_format="json")
    with Client(redis_url) as client:
        for _ in range(50):
            client.infer("mlp", {"x": np.ones((1, 256), np.float32)}, timeout=30)
    assert pool.stop() == 0
    log_path = pool.log_path
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    messages = [r["message"] for r in records]
    assert all({"ts", "level", "logger", "process", "message"} <= set(r) for r in records)
    assert any("model loaded: mlp" in m for m in messages)
    assert any("started worker" in m for m in messages)
    assert any("drained and stopped" in m for m in messages)
    assert any(r["process"].endswith("cpu:0") for r in records)  # worker lines are labelled
    assert len(records) < 40  # 50 requests served, no line per request
