"""The worker's last-minute figures (worker/stats.py): percentiles against
exact ones within the histogram's stated error, rows/s and the sparkline,
buckets rolling off after a minute, and a size that does not grow with
the number of records. The clock is injected; nothing sleeps."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable

import numpy as np
import pytest

from worker.stats import (
    BUCKET_S,
    BUCKETS,
    HIGH_MS,
    RELATIVE_ERROR,
    BatchPart,
    LatencyWindow,
    Stats,
    latency_bin,
)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def exact(values: list[float], q: float) -> float:
    """The rank the worker reports: int(n * q / 100), 0-based, of the sorted values."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


def close(reported: float, truth: float) -> bool:
    # the bin's error, plus the rounding to 0.01 ms of the heartbeat's figures
    return abs(reported - truth) <= truth * RELATIVE_ERROR * 1.0001 + 0.005


@pytest.mark.parametrize(
    "draw",
    [
        lambda rng, n: rng.lognormal(1.0, 1.2, n),  # ms: a long tail
        lambda rng, n: rng.uniform(0.2, 3.0, n),
        lambda rng, n: 50 + rng.exponential(400, n),  # a slow model, seconds of queueing
    ],
)
def test_percentiles_are_within_the_stated_error_of_exact_ones(
    draw: Callable[[np.random.Generator, int], np.ndarray],
) -> None:
    rng = np.random.default_rng(7)
    clock = Clock()
    stats = Stats(clock=clock)
    latencies: list[float] = []
    for _ in range(400):
        infer_ms = float(rng.uniform(0.1, 5.0))
        waits = draw(rng, int(rng.integers(1, 20)))
        parts = [BatchPart(int(rng.integers(1, 60)), 1, float(w)) for w in waits]
        stats.record_batch("mlp", parts, infer_ms, 0)
        # a part counts once per request it holds, as if each were alone
        latencies += [p.wait_ms + infer_ms for p in parts for _ in range(p.requests)]
        clock.now += 0.1
    minute = stats.last_minute()["mlp"]
    assert close(minute["p50_ms"], exact(latencies, 50)), (minute, exact(latencies, 50))
    assert close(minute["p99_ms"], exact(latencies, 99)), (minute, exact(latencies, 99))


def test_parts_weigh_by_their_requests() -> None:
    stats = Stats(clock=Clock())
    # 1 request at 1 ms, 99 in one bundle at 100 ms: by request, the median is 100 ms
    stats.record_batch("mlp", [BatchPart(1, 1, 0.0), BatchPart(99, 99, 99.0)], 1.0, 0)
    minute = stats.last_minute()["mlp"]
    assert close(minute["p50_ms"], 100.0)
    assert stats.requests == 100 and stats.rows == 100 and stats.batches == 1


def test_values_outside_the_bins_are_clamped() -> None:
    assert latency_bin(0.0) == 0 and latency_bin(-1.0) == 0 and latency_bin(float("nan")) == 0
    assert latency_bin(float("inf")) == latency_bin(HIGH_MS) == latency_bin(HIGH_MS * 0.9999) + 1
    stats = Stats(clock=Clock())
    stats.record_batch("mlp", [BatchPart(1, 1, 1e12)], 1.0, 0)
    assert stats.last_minute()["mlp"]["p99_ms"] == HIGH_MS
    stats.record_batch("seq", [BatchPart(1, 1, 0.0)], 0.0, 0)
    assert stats.last_minute()["seq"]["p50_ms"] == 0.0


def test_rows_per_second_and_the_sparkline() -> None:
    clock = Clock(now=BUCKET_S * 1000)  # the start of a bucket
    stats = Stats(clock=clock)
    # one batch per second for a minute: k rows in the k-th 5 s interval
    for second in range(60):
        k = second // 5
        stats.record_batch("mlp", [BatchPart(1, k, 0.5)], 1.0, 0)
        clock.now += 1.0
    clock.now -= 0.5  # inside the 12th interval, 4.5 s into it
    minute = stats.last_minute()["mlp"]
    assert minute["spark"] == [5 * k for k in range(12)]
    assert minute["rows_per_s"] == pytest.approx(sum(5 * k for k in range(12)) / 59.5, abs=0.01)
    assert stats.rows == sum(5 * k for k in range(12))


def test_a_steady_rate_reads_as_that_rate_at_any_point_of_a_bucket() -> None:
    clock = Clock(now=12_345.3)
    stats = Stats(clock=clock)
    readings = []
    for step in range(3000):  # 50 rows/s: 5 rows every 0.1 s, for 5 minutes
        stats.record_batch("mlp", [BatchPart(5, 5, 1.0)], 1.0, 0)
        if step >= 650:  # a whole minute recorded
            readings.append(stats.last_minute()["mlp"]["rows_per_s"])
        clock.now += 0.1
    assert min(readings) == pytest.approx(50, rel=0.03)
    assert max(readings) == pytest.approx(50, rel=0.03)


def test_old_buckets_roll_off_after_a_minute() -> None:
    clock = Clock(now=BUCKET_S * 2000)
    stats = Stats(clock=clock)
    stats.record_batch("mlp", [BatchPart(10, 10, 1000.0)], 1.0, 0)  # slow ones, long ago
    clock.now += BUCKET_S * (BUCKETS - 1)  # the first bucket is still the oldest shown
    stats.record_batch("mlp", [BatchPart(1, 1, 1.0)], 1.0, 0)
    minute = stats.last_minute()["mlp"]
    assert minute["spark"][0] == 10 and minute["spark"][-1] == 1
    assert close(minute["p99_ms"], 1001.0)
    clock.now += BUCKET_S  # 60 s on: the first bucket has gone
    minute = stats.last_minute()["mlp"]
    assert minute["spark"] == [0] * 10 + [1, 0]
    assert close(minute["p99_ms"], 2.0) and close(minute["p50_ms"], 2.0)
    assert minute["rows_per_s"] == pytest.approx(1 / (BUCKET_S * (BUCKETS - 1)), abs=0.01)
    # a bucket reused for a new interval starts empty
    stats.record_batch("mlp", [BatchPart(3, 3, 5.0)], 1.0, 0)
    assert stats.last_minute()["mlp"]["spark"] == [0] * 10 + [1, 3]
    clock.now += BUCKET_S * BUCKETS  # a quiet minute
    assert stats.last_minute()["mlp"] == {
        "rows_per_s": 0.0, "p50_ms": 0.0, "p99_ms": 0.0, "spark": [0] * 12,
        "real_elements": 0, "padding_share": 1.0,
    }  # fmt: skip
    assert stats.rows == 14  # the totals stay


def deep_size(window: LatencyWindow) -> int:
    arrays: list[array[int]] = [window.epochs, window.rows, *window.histograms]
    return (
        sys.getsizeof(window)
        + sys.getsizeof(window.histograms)
        + sum(sys.getsizeof(a) + a.itemsize * len(a) for a in arrays)
    )


def test_the_structure_stays_the_same_size_however_many_records() -> None:
    clock = Clock()
    stats = Stats(clock=clock)
    stats.record_batch("mlp", [BatchPart(1, 1, 1.0)], 1.0, 0)
    window = stats.windows["mlp"]
    histograms = list(window.histograms)
    size = deep_size(window)
    rng = np.random.default_rng(3)
    for i in range(200_000):  # 2 minutes at ~1,700 batches/s, a part per request
        stats.record_batch("mlp", [BatchPart(1, 1, float(rng.exponential(3.0)))], 0.5, 0)
        clock.now += 0.0006
        if i % 10_000 == 0:
            stats.last_minute()
    assert stats.windows["mlp"] is window and deep_size(window) == size
    assert all(a is b for a, b in zip(window.histograms, histograms, strict=True))  # reused
    assert stats.requests == 200_001
    # what the last minute holds is about a minute of them
    assert sum(stats.last_minute()["mlp"]["spark"]) == pytest.approx(60 / 0.0006, rel=0.1)


def test_padding_share_over_the_last_minute() -> None:
    clock = Clock(now=BUCKET_S * 3000)
    stats = Stats(clock=clock)
    stats.record_batch("seq", [BatchPart(4, 4, 1.0)], 1.0, 0, padded=300, real=200)
    clock.now += BUCKET_S
    stats.record_batch("seq", [BatchPart(4, 4, 1.0)], 1.0, 0, padded=100, real=100)
    minute = stats.last_minute()["seq"]
    assert (minute["padding_share"], minute["real_elements"]) == (round(400 / 300, 3), 300)
    clock.now += BUCKET_S * (BUCKETS - 1)  # the first batch's bucket has gone
    assert stats.last_minute()["seq"]["padding_share"] == 1.0
    assert stats.last_minute()["seq"]["real_elements"] == 100
