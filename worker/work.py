"""The data handed between the worker's parts, in the order a request
meets them: a ``Stream`` is read into ``Accepted`` requests, the scheduler
groups them into a ``Batch``, and every request ends as one ``Outcome`` for
the writer. Plain values: no part reaches into another's state through them.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.envelope import Request
from worker.registry import LoadedModel


@dataclass(frozen=True)
class Stream:
    """One Redis stream this worker consumes: a model's normal or high-priority queue."""

    queue: str
    model: str
    priority: int


@dataclass(frozen=True)
class Accepted:
    """A delivered, decoded and validated request waiting for its batch."""

    stream: Stream
    entry_id: bytes
    request: Request
    rows: int
    deliveries: int = 1  # times Redis has delivered it, this delivery included

    @property
    def redelivered(self) -> bool:
        return self.deliveries > 1

    @property
    def enqueued_ms(self) -> float:
        """The XADD time, from the entry id (Redis server clock)."""
        return float(self.entry_id.split(b"-", 1)[0])


@dataclass(frozen=True)
class Batch:
    """Requests of one stream computed in one forward call, on one model version."""

    stream: Stream
    model: LoadedModel
    items: tuple[Accepted, ...]

    @property
    def rows(self) -> int:
        return sum(item.rows for item in self.items)


@dataclass(frozen=True)
class Outcome:
    """A packed result ready to be written (empty ``payload``: ack only), and
    the stream entry it acknowledges."""

    queue: str
    entry_id: bytes
    request_id: str
    reply_to: str | None
    payload: bytes
