"""The worker's in-memory bookkeeping: delivered requests waiting for a
batch (``Pending``), one backlog per model (``Lane``), and results waiting to
be written (``Outcome``)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.envelope import Request
from worker.registry import LoadedModel
from worker.window import WindowModel


@dataclass
class Pending:
    """A delivered stream entry waiting for its batch."""

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


@dataclass
class Outcome:
    """A result ready to be written (empty ``payload``: ack only), and the
    stream entry it acknowledges."""

    queue: str
    entry_id: bytes
    request_id: str
    reply_to: str | None
    payload: bytes


@dataclass
class Lane:
    """One model's stream: its backlog of validated requests and every entry
    this worker holds (read and not yet acknowledged)."""

    model: LoadedModel
    queue: str
    priority: int = 0
    backlog: deque[Pending] = field(default_factory=deque)
    rows: int = 0
    held: set[bytes] = field(default_factory=set)
    more_waiting: bool = False  # the last read filled its COUNT: Redis holds more
    recovering: bool = True  # own pending entries to re-read first (start, reclaim)
    recover_after: str = "-"  # XPENDING cursor while recovering
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    reader_done: bool = False
    window: WindowModel = field(default_factory=WindowModel)

    @property
    def max_rows(self) -> int:
        return self.model.spec.max_batch_size

    def push(self, items: Sequence[Pending]) -> None:
        self.backlog.extend(items)
        rows = sum(p.rows for p in items)
        self.rows += rows
        self.window.record_arrival(rows)
        self.changed.set()

    def take(self) -> list[Pending]:
        """The next batch: whole requests up to max_rows. A redelivered request
        (its worker died, maybe because of it) runs alone, so a poison request
        cannot take its neighbours down with it again."""
        taken: list[Pending] = []
        rows = 0
        while self.backlog:
            head = self.backlog[0]
            if taken and (head.redelivered or taken[0].redelivered):
                break
            if taken and rows + head.rows > self.max_rows:
                break
            self.backlog.popleft()
            rows += head.rows
            taken.append(head)
        self.rows -= rows
        self.changed.set()  # wakes a reader waiting for room
        return taken
