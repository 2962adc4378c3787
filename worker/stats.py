"""A worker's running figures for its heartbeat (totals, and per model the
last minute's rows/s, latency percentiles and a sparkline), fed by the
scheduler and the reader, and the Prometheus histograms when the pool
exports metrics.

The last minute is held in a fixed structure whose size does not depend on
the request rate: per model 12 time buckets of 5 s (the sparkline's), each
with its rows and a latency histogram of log-spaced bins (``BIN_GROWTH``
apart, from ``LOW_MS`` to ``HIGH_MS``). A percentile is the centre of the
bin its rank falls in: within ``RELATIVE_ERROR`` of the exact one between
``LOW_MS`` and ``HIGH_MS`` (below: reported 0; above: ``HIGH_MS``)."""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from common.records import now_ms
from worker.grouping import padding_share
from worker.metrics import WorkerMetrics

BUCKET_S = 5.0
BUCKETS = 12  # the sparkline's 12 x 5 s
WINDOW_S = BUCKET_S * BUCKETS
LOW_MS = 0.001
HIGH_MS = 1e7  # 2.8 hours: past any deadline worth keeping a request for
BIN_GROWTH = 1.04
RELATIVE_ERROR = math.sqrt(BIN_GROWTH) - 1  # 1.98 %: a bin's centre to its edges
# bin 0: under LOW_MS; bins 1..n: [LOW_MS * g^(i-1), LOW_MS * g^i); the last: HIGH_MS and over
BINS = math.ceil(math.log(HIGH_MS / LOW_MS) / math.log(BIN_GROWTH)) + 2
_INV_LOG_GROWTH = 1 / math.log(BIN_GROWTH)
_CENTRES = np.array(
    [0.0]
    + [LOW_MS * BIN_GROWTH ** (i - 1) * math.sqrt(BIN_GROWTH) for i in range(1, BINS - 1)]
    + [HIGH_MS]
)
_ZEROS = array("q", bytes(8 * BINS))  # copied over a bucket to clear it


class BatchPart(NamedTuple):
    """Requests of one stream entry computed in one batch (a bundle, or a
    single request): they share the entry's queue wait."""

    requests: int
    rows: int
    wait_ms: float


def latency_bin(ms: float) -> int:
    if not ms >= LOW_MS:  # NaN too, which no comparison admits
        return 0
    if ms >= HIGH_MS:  # inf too, which int() refuses
        return BINS - 1
    return min(BINS - 2, int(math.log(ms / LOW_MS) * _INV_LOG_GROWTH) + 1)


class LatencyWindow:
    """One model's last minute: a ring of ``BUCKETS`` buckets, each the
    rows done in one ``BUCKET_S`` interval and a histogram of their
    requests' latencies. Its arrays are allocated once; a bucket is
    cleared in place when the ring comes round to it again."""

    __slots__ = ("epochs", "histograms", "padded", "real", "rows")

    def __init__(self) -> None:
        self.epochs = array("q", [-1] * BUCKETS)  # which interval (clock // BUCKET_S) each holds
        self.rows = array("q", [0] * BUCKETS)
        # input elements computed (padding included) and requested, for variable axes
        self.padded = array("q", [0] * BUCKETS)
        self.real = array("q", [0] * BUCKETS)
        self.histograms = [array("q", bytes(8 * BINS)) for _ in range(BUCKETS)]

    def bucket(self, now: float) -> int:
        """The bucket for ``now``, cleared first if it held an older interval."""
        epoch = int(now // BUCKET_S)
        slot = epoch % BUCKETS
        if self.epochs[slot] != epoch:
            self.epochs[slot] = epoch
            self.rows[slot] = 0
            self.padded[slot] = self.real[slot] = 0
            self.histograms[slot][:] = _ZEROS
        return slot

    def summary(self, now: float) -> dict[str, Any]:
        """rows/s, p50/p99 (ms) and the sparkline (rows per bucket, oldest
        first; the last is the current, partial interval)."""
        epoch = int(now // BUCKET_S)
        spark = [0] * BUCKETS
        live: list[array[int]] = []
        padded = real = 0
        for slot in range(BUCKETS):
            age = epoch - self.epochs[slot]
            if 0 <= age < BUCKETS:
                spark[BUCKETS - 1 - age] = self.rows[slot]
                live.append(self.histograms[slot])
                padded += self.padded[slot]
                real += self.real[slot]
        # 11 whole intervals and the part of the current one gone by
        span = WINDOW_S - BUCKET_S + (now - epoch * BUCKET_S)
        counts = (
            np.sum([np.frombuffer(h, dtype=np.int64) for h in live], axis=0)
            if live
            else np.zeros(BINS, dtype=np.int64)
        )
        return {
            "rows_per_s": round(sum(spark) / span, 2),
            "p50_ms": round(_percentile(counts, 50), 2),
            "p99_ms": round(_percentile(counts, 99), 2),
            "spark": spark,
            # variable-axis models: input elements requested, and computed with padding over them
            "real_elements": real,
            "padding_share": round(padding_share(padded, real), 3),
        }


def _percentile(counts: np.ndarray[Any, Any], q: float) -> float:
    """The centre of the bin holding the value of rank ``int(n * q / 100)``
    (0-based) among the ``n`` counted."""
    total = int(counts.sum())
    if total == 0:
        return 0.0
    rank = min(total - 1, int(total * q / 100))
    cumulative = np.cumsum(counts)
    return float(_CENTRES[int(np.searchsorted(cumulative, rank, side="right"))])


@dataclass
class Stats:
    """``clock`` (seconds) places records in the last minute's buckets; tests
    inject one."""

    metrics: WorkerMetrics | None = None
    batches: int = 0
    requests: int = 0
    rows: int = 0
    errors: int = 0
    started_ms: float = field(default_factory=now_ms)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    windows: dict[str, LatencyWindow] = field(default_factory=dict, init=False, repr=False)

    def count_errors(self, n: int) -> None:
        self.errors += n

    def record_batch(
        self,
        model: str,
        parts: Sequence[BatchPart],
        infer_ms: float,
        failures: int,
        *,
        padded: int = 0,
        real: int = 0,
    ) -> None:
        """One computed batch: its parts (requests that shared an entry share
        a wait), the forward's time and how many requests failed alone;
        for a model with a variable axis, the input elements it computed
        (``padded``) and those its requests hold (``real``).
        Each part costs one histogram update, weighted by its requests."""
        window = self.windows.get(model)
        if window is None:
            window = self.windows[model] = LatencyWindow()
        slot = window.bucket(self.clock())
        histogram = window.histograms[slot]
        rows = 0
        requests = 0
        for part_requests, part_rows, wait_ms in parts:
            histogram[latency_bin(wait_ms + infer_ms)] += part_requests
            rows += part_rows
            requests += part_requests
        window.rows[slot] += rows
        window.padded[slot] += padded
        window.real[slot] += real
        if self.metrics is not None:
            self.metrics.record_batch(
                model, rows, infer_ms / 1000,
                [p.wait_ms / 1000 for p in parts for _ in range(p.requests)],  # one per request
                padded, real,
            )  # fmt: skip
        self.batches += 1
        self.requests += requests
        self.rows += rows
        self.errors += failures

    @property
    def mean_batch_rows(self) -> float:
        return round(self.rows / self.batches, 2) if self.batches else 0.0

    def last_minute(self) -> dict[str, dict[str, Any]]:
        """Per model: rows/s, latency percentiles and a 12 x 5 s sparkline of rows."""
        now = self.clock()
        return {model: window.summary(now) for model, window in self.windows.items()}
