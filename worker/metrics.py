"""Worker-side Prometheus histograms, in prometheus_client's multiprocess mode:
each worker process records into files under ``PROMETHEUS_MULTIPROC_DIR``
(set by the pool before the child starts), and the pool parent serves the
aggregate on ``[worker] metrics_port``. Names are documented in
docs/metrics.md.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class WorkerMetrics:
    """Histograms a worker process records; created only when the pool
    exports metrics (the environment variable is set)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.batch_rows = Histogram(
            "tensorq_worker_batch_rows",
            "Rows per forward call",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )
        self.queue_wait = Histogram(
            "tensorq_worker_queue_wait_seconds",
            "From XADD to the start of the request's batch",
            ["model"],
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
        )
        self.compute = Histogram(
            "tensorq_worker_compute_seconds",
            "Assembly + forward + split of one batch",
            ["model"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
        )

        # padding share = padded / real, for models with a variable input axis
        self.padded_elements = Counter(
            "tensorq_worker_padded_elements",
            "Input elements computed, padding included (variable-axis models)",
            ["model"],
        )
        self.real_elements = Counter(
            "tensorq_worker_real_elements",
            "Input elements the requests hold (variable-axis models)",
            ["model"],
        )

    def record_batch(
        self,
        model: str,
        rows: int,
        compute_s: float,
        waits_s: list[float],
        padded: int = 0,
        real: int = 0,
    ) -> None:
        self.batch_rows.labels(model).observe(rows)
        if real:
            self.padded_elements.labels(model).inc(padded)
            self.real_elements.labels(model).inc(real)
        self.compute.labels(model).observe(compute_s)
        queue_wait = self.queue_wait.labels(model)
        for wait in waits_s:
            queue_wait.observe(wait)


def worker_metrics() -> WorkerMetrics | None:
    return WorkerMetrics() if os.environ.get(MULTIPROC_ENV) else None


class MetricsServer:
    """In the pool parent: a fresh multiprocess directory for the children and
    an HTTP endpoint aggregating their files."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.directory = tempfile.mkdtemp(prefix="tensorq-metrics-")
        self._server: Any = None

    def start(self) -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)  # type: ignore[no-untyped-call]
        self._server, _ = start_http_server(self.port, registry=registry)
        log.info("worker metrics on port %d", self.port)

    def child_died(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path=self.directory)  # type: ignore[no-untyped-call]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
        shutil.rmtree(self.directory, ignore_errors=True)
