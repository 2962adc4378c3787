"""A worker's running figures for its heartbeat (totals, and per model the
last minute's rows/s, latency percentiles and a sparkline), fed by the
scheduler and the reader, and the Prometheus histograms when the pool
exports metrics."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from common.records import now_ms
from worker.metrics import WorkerMetrics


class BatchPart(NamedTuple):
    """Requests of one stream entry computed in one batch (a bundle, or a
    single request): they share the entry's queue wait."""

    requests: int
    rows: int
    wait_ms: float


@dataclass
class Stats:
    metrics: WorkerMetrics | None = None
    batches: int = 0
    requests: int = 0
    rows: int = 0
    errors: int = 0
    started_ms: float = field(default_factory=now_ms)
    # per model: (done at, unix s; rows; latency ms = queued + infer), last minute
    recent: dict[str, deque[tuple[float, int, float]]] = field(default_factory=dict)

    def count_errors(self, n: int) -> None:
        self.errors += n

    def record_batch(
        self, model: str, parts: Sequence[BatchPart], infer_ms: float, failures: int
    ) -> None:
        """One computed batch: its parts (requests that shared an entry share
        a wait), the forward's time and how many requests failed alone."""
        rows = 0
        requests = 0
        for part in parts:
            self._record(model, part.rows, part.wait_ms + infer_ms)
            rows += part.rows
            requests += part.requests
        if self.metrics is not None:
            self.metrics.record_batch(
                model, rows, infer_ms / 1000,
                [p.wait_ms / 1000 for p in parts for _ in range(p.requests)],  # one per request
            )  # fmt: skip
        self.batches += 1
        self.requests += requests
        self.rows += rows
        self.errors += failures

    def _record(self, model: str, rows: int, latency_ms: float) -> None:
        window = self.recent.setdefault(model, deque())
        now = time.time()
        window.append((now, rows, latency_ms))
        while window and window[0][0] < now - 60:
            window.popleft()

    @property
    def mean_batch_rows(self) -> float:
        return round(self.rows / self.batches, 2) if self.batches else 0.0

    def last_minute(self) -> dict[str, dict[str, Any]]:
        """Per model: rows/s, latency percentiles and a 12 x 5 s sparkline of rows."""
        now = time.time()
        summary: dict[str, dict[str, Any]] = {}
        for model, window in self.recent.items():
            done = [(t, r, ms) for t, r, ms in list(window) if t >= now - 60]  # a snapshot
            latencies = sorted(ms for _, _, ms in done)
            spark = [0] * 12
            for t, rows, _ in done:
                spark[min(11, int((t - (now - 60)) // 5))] += rows
            summary[model] = {
                "rows_per_s": round(sum(r for _, r, _ in done) / 60, 2),
                "p50_ms": round(_percentile(latencies, 50), 2),
                "p99_ms": round(_percentile(latencies, 99), 2),
                "spark": spark,
            }
        return summary


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q / 100))]
