"""Worker histograms: every worker process records into prometheus_client's
multiprocess files and the pool parent serves the aggregate."""

from __future__ import annotations

import re
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from producer import AsyncClient, Submission
from tests.conftest import PoolHandle, wait_until, write_config


async def test_pool_serves_worker_histograms(
    tmp_path: Path, models_dir: Path, redis_url: str, start_pool: Callable[..., PoolHandle]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = write_config(tmp_path / "t.toml", models_dir)
    pool = start_pool(config, redis_url, env={"TQ_WORKER_METRICS_PORT": str(port)})
    x = np.ones((1, 256), np.float32)
    async with AsyncClient(redis_url) as client:
        ids = await client.submit_many([Submission("mlp", {"x": x}) for _ in range(500)])
        results = [await client.wait(i, timeout=60) for i in ids]
    assert {r.status for r in results} == {"ok"}
    wait_until(
        lambda: sum(int(w["requests"]) for w in pool.live_workers()) == 500,  # type: ignore[call-overload]
        30,
        "heartbeats counting every request",
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()

    def value(name: str) -> float:
        found = re.search(rf'^{name}{{model="mlp"}} ([0-9.e+]+)$', text, re.MULTILINE)
        assert found, f"{name} missing"
        return float(found.group(1))

    heartbeat_batches = sum(int(w["batches"]) for w in pool.live_workers())  # type: ignore[call-overload]
    assert value("tensorq_worker_batch_rows_count") == heartbeat_batches
    assert value("tensorq_worker_batch_rows_sum") == 500  # every row of every batch
    assert value("tensorq_worker_queue_wait_seconds_count") == 500  # one per request
    assert value("tensorq_worker_compute_seconds_sum") > 0
