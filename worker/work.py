"""The data handed between the worker's parts, in the order a request
meets them: a ``Stream`` is read into ``Accepted`` parcels (the requests of
one stream entry: one request, or a bundle's members with their inputs
stacked), the scheduler groups parcels into a ``Batch``, and every request
ends in an ``Outcome`` for the writer. Plain values: no part reaches into
another's state through them.

A parcel is handled as one piece wherever its members allow it (one
validation, one slice of the batch, one packed answer), so a batch of
bundles of 1-row requests touches Python once per bundle, not once per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from common.envelope import Arrays, Request, Result, pack_result
from worker.registry import LoadedModel


@dataclass(frozen=True)
class Stream:
    """One Redis stream this worker consumes: a model's normal or high-priority queue."""

    queue: str
    model: str
    priority: int


@dataclass(frozen=True)
class Accepted:
    """Delivered, decoded and validated requests of one stream entry waiting
    for their batch: member i has id ``ids[i]`` and rows
    ``offsets[i]:offsets[i+1]`` of every input."""

    stream: Stream
    entry_id: bytes
    ids: tuple[str, ...]
    offsets: tuple[int, ...]
    inputs: Arrays
    deadlines: tuple[int | None, ...]
    reply_to: tuple[str | None, ...]
    store: tuple[bool, ...]  # keep the result under tq:r:<id>
    deliveries: int = 1  # times Redis has delivered the entry, this delivery included

    @classmethod
    def single(
        cls, stream: Stream, entry_id: bytes, request: Request, rows: int, deliveries: int = 1
    ) -> Accepted:
        return cls(stream, entry_id, (request.id,), (0, rows), request.inputs,
                   (request.deadline_ms,), (request.reply_to,),
                   (request.store or request.reply_to is None,), deliveries)  # fmt: skip

    @property
    def rows(self) -> int:
        return self.offsets[-1]

    @property
    def count(self) -> int:
        return len(self.ids)

    @property
    def redelivered(self) -> bool:
        return self.deliveries > 1

    @cached_property
    def enqueued_ms(self) -> float:
        """The XADD time, from the entry id (Redis server clock)."""
        return float(self.entry_id.split(b"-", 1)[0])

    @cached_property
    def earliest_deadline(self) -> int | None:
        deadlines = [d for d in self.deadlines if d is not None]
        return min(deadlines) if deadlines else None

    @cached_property
    def row_size(self) -> int:
        """Elements in one row of all its inputs (the members share their per-row shapes)."""
        return sum(a.size // a.shape[0] for a in self.inputs.values() if a.shape[0])

    def member_rows(self, i: int) -> int:
        return self.offsets[i + 1] - self.offsets[i]

    def split(self, k: int) -> tuple[Accepted, Accepted]:
        """The first ``k`` members and the rest (inputs as views)."""
        cut = self.offsets[k]
        head = self._part(slice(0, k), {n: a[:cut] for n, a in self.inputs.items()},
                          self.offsets[: k + 1])  # fmt: skip
        rest = self._part(slice(k, None), {n: a[cut:] for n, a in self.inputs.items()},
                          tuple(o - cut for o in self.offsets[k:]))  # fmt: skip
        return head, rest

    def select(self, members: Sequence[int]) -> Accepted:
        """These members only, in this order."""
        if list(members) == list(range(members[0], members[0] + len(members))):
            first, end = members[0], members[0] + len(members)
            start, stop = self.offsets[first], self.offsets[end]
            inputs = {n: a[start:stop] for n, a in self.inputs.items()}
            rebased = tuple(o - start for o in self.offsets[first : end + 1])
            return self._part(slice(first, end), inputs, rebased)
        rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in members])
        offsets = [0]
        for i in members:
            offsets.append(offsets[-1] + self.member_rows(i))
        return Accepted(
            self.stream, self.entry_id, tuple(self.ids[i] for i in members), tuple(offsets),
            {n: a[rows] for n, a in self.inputs.items()},
            tuple(self.deadlines[i] for i in members), tuple(self.reply_to[i] for i in members),
            tuple(self.store[i] for i in members), self.deliveries,
        )  # fmt: skip

    def members(self) -> list[Accepted]:
        """Each member as a parcel of its own."""
        return [self.select([i]) for i in range(self.count)]

    def _part(self, members: slice, inputs: Arrays, offsets: tuple[int, ...]) -> Accepted:
        return Accepted(self.stream, self.entry_id, self.ids[members], offsets, inputs,
                        self.deadlines[members], self.reply_to[members], self.store[members],
                        self.deliveries)  # fmt: skip


@dataclass(frozen=True)
class Batch:
    """Parcels of one stream computed in one forward call, on one model version."""

    stream: Stream
    model: LoadedModel
    items: tuple[Accepted, ...]

    @property
    def rows(self) -> int:
        return sum(item.rows for item in self.items)

    @property
    def requests(self) -> int:
        return sum(item.count for item in self.items)

    @property
    def elements(self) -> int:
        """The requests' own input elements, before any padding."""
        return sum(a.size for item in self.items for a in item.inputs.values())


@dataclass(frozen=True)
class Outcome:
    """Answers to members of one stream entry, ready to be written.

    ``pushes`` are the inbox elements (one packed result, or a result bundle
    for many members); ``singles`` packs each member's own result, for the
    ones to keep under ``tq:r:<id>`` (those that asked, and every member of
    an entry not yet fully answered, so its redelivery can tell them done).
    ``singles`` None: the members were answered before (ack only)."""

    queue: str
    entry_id: bytes
    ids: tuple[str, ...]
    store: tuple[bool, ...]
    pushes: tuple[tuple[str, bytes], ...] = ()
    singles: Callable[[], Sequence[bytes]] | None = None

    @classmethod
    def ack_only(cls, queue: str, entry_id: bytes, ids: Sequence[str]) -> Outcome:
        return cls(queue, entry_id, tuple(ids), (False,) * len(ids))

    @classmethod
    def of_results(
        cls,
        queue: str,
        entry_id: bytes,
        results: Sequence[Result],
        reply_to: Sequence[str | None],
        store: Sequence[bool],
    ) -> Outcome:
        """Answers packed one by one (failures, and requests answered apart)."""
        payloads = [pack_result(r) for r in results]
        pushes = tuple((r, p) for r, p in zip(reply_to, payloads, strict=True) if r)
        return cls(queue, entry_id, tuple(r.id for r in results), tuple(store), pushes,
                   fixed(payloads))  # fmt: skip

    @property
    def answered(self) -> int:
        return len(self.ids)


def fixed(payloads: Sequence[bytes]) -> Callable[[], Sequence[bytes]]:
    """``Outcome.singles`` for results already packed."""
    return lambda: payloads
