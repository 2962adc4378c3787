"""How long a batch may wait to fill, per model (``batch_policy``).

``fixed``: wait up to ``max_delay_ms``, and only while the last read showed
Redis holding more; an idle worker runs a lone request at once.

``adaptive`` (after BentoML's corking dispatcher): fit the compute time of
recent batches as ``t(b) = a + c*b`` and measure the arrival rate ``lam``
(rows/ms). Dispatching ``n`` rows now costs ``t(n)/n = a/n + c`` per row;
waiting ``w`` for ``lam*w`` more costs ``(w + a)/(n + lam*w) + c``. The second
is smaller exactly when ``n < a*lam``: waiting pays off only while fewer rows
are ready than arrive during one batch's fixed overhead. So it waits while
that holds, never past ``max_delay_ms``, and not at all when idle (lam = 0).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class WindowModel:
    """Recent batch timings and arrivals of one lane."""

    batches: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=64))
    lone: tuple[int, float] | None = None  # the latest one-row batch: input elements, ms
    arrivals: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=4096))
    horizon_s: float = 1.0

    def record_batch(self, rows: int, infer_ms: float, elements: int = 0) -> None:
        """A computed batch; ``elements``: its input elements (padded)."""
        self.batches.append((rows, infer_ms))
        if rows == 1 and elements:
            self.lone = (elements, infer_ms)

    def record_arrival(self, rows: int, now: float | None = None) -> None:
        self.arrivals.append((time.monotonic() if now is None else now, rows))

    def lone_ms(self, elements: int) -> float | None:
        """A one-row forward of ``elements`` input elements: the latest one
        scaled up by size, never down (None before the first)."""
        if self.lone is None:
            return None
        seen, ms = self.lone
        return ms * max(1.0, elements / seen)

    def batch_ms(self) -> float:
        """The mean compute time of recent batches (0 before the first)."""
        return sum(t for _, t in self.batches) / len(self.batches) if self.batches else 0.0

    def overhead_ms(self) -> float:
        """``a`` of the least-squares fit ``t = a + c*b`` (0 until it can be fitted)."""
        if len(self.batches) < 4:
            return 0.0
        n = len(self.batches)
        mean_b = sum(b for b, _ in self.batches) / n
        mean_t = sum(t for _, t in self.batches) / n
        var_b = sum((b - mean_b) ** 2 for b, _ in self.batches)
        if var_b == 0:  # one batch size only: attribute it all to overhead, conservatively
            return 0.0
        slope = sum((b - mean_b) * (t - mean_t) for b, t in self.batches) / var_b
        return max(0.0, mean_t - slope * mean_b)

    def arrival_rate(self, now: float | None = None) -> float:
        """Rows per millisecond over the last ``horizon_s``."""
        now = time.monotonic() if now is None else now
        while self.arrivals and self.arrivals[0][0] < now - self.horizon_s:
            self.arrivals.popleft()
        return sum(rows for _, rows in self.arrivals) / (self.horizon_s * 1000)

    def worth_waiting(self, ready_rows: int, now: float | None = None) -> bool:
        return ready_rows < self.overhead_ms() * self.arrival_rate(now)
