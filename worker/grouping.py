"""Length-aware batch formation for models with a variable input axis
(``group_by_length``): which of a backlog's parcels go into the next batch,
so that a batch pads its requests to a length near their own instead of to
the longest of whatever arrived together.

Pure: it sees one number per parcel (its size per row: the elements of one
row of all its inputs, so the length for a sequence model), its rows, how
often it has been passed over, and whether it may join others; it answers
with parcel indices in the order the batch should take them. The scheduler
then fills the batch from that order under ``max_batch_size`` and
``max_batch_bytes`` as it does in arrival order.

The rule:

1. Forced first, oldest first: every parcel passed over ``max_passed_over``
   times already, and every parcel whose deadline is near (it would pass
   before the pass-over bound could be honoured).
2. The oldest arrivals are served next: the batch holds at least one parcel
   of the oldest ones (so nothing starves and arrival order still decides
   who is served next). When the oldest parcel arrived alone it is forced
   in; when others arrived with it (``tied``: within the model's
   ``max_delay_ms`` of it, e.g. one ``submit_many``), none of them has a
   claim to go first, so any one of them will do.
3. The rest of the batch is the run of parcels, contiguous in size order,
   that wastes the fewest padded elements once padded to the longest of it
   and of the forced ones (and that holds one of the oldest arrivals if
   none is forced in); among equal waste the oldest run, so uniform lengths
   keep arrival order exactly.
4. Within the batch, nearest in size to the oldest parcel in it first: if
   the padded byte limit cuts the batch short, what it drops is the least
   alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Column = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Candidate:
    """One parcel of the backlog as a row: the readable way to write a
    backlog down (``BacklogColumns.of``), as the tests do."""

    size: int  # elements of one row, all inputs together
    rows: int
    forced: bool  # passed over too often, or its deadline is near
    joinable: bool = True  # False: a redelivered request, which runs alone
    tied: bool = False  # arrived with the oldest parcel, within max_delay_ms of it


@dataclass(frozen=True)
class BacklogColumns:
    """A backlog's parcels as columns, in arrival order (the oldest first):
    the scheduler builds these in one pass per batch, so the choice costs a
    few numpy calls rather than Python work per parcel."""

    sizes: Column  # int64: elements of one row, all inputs together
    rows: Column  # int64
    forced: Column  # bool: passed over too often, or its deadline is near
    joinable: Column  # bool: False for a redelivered request, which runs alone
    tied: Column  # bool: arrived with the oldest, within the model's max_delay_ms of it

    @classmethod
    def of(cls, candidates: Sequence[Candidate]) -> BacklogColumns:
        return cls(
            np.array([c.size for c in candidates], dtype=np.int64),
            np.array([c.rows for c in candidates], dtype=np.int64),
            np.array([c.forced for c in candidates], dtype=bool),
            np.array([c.joinable for c in candidates], dtype=bool),
            np.array([c.tied for c in candidates], dtype=bool),
        )


def batch_order(backlog: BacklogColumns, max_rows: int) -> list[int]:
    """Indices into the backlog (arrival order, the oldest first) in the
    order the next batch should take them; enough for ``max_rows`` rows
    when the backlog holds them."""
    sizes, rows = backlog.sizes, backlog.rows
    if not len(sizes):
        return []
    is_forced = backlog.forced.copy()
    oldest = backlog.tied.copy()
    oldest[0] = True
    # one of the oldest arrivals in the run, unless one is forced in already
    anchors = oldest & backlog.joinable & ~is_forced
    anchored = bool((is_forced & oldest).any())
    if not anchored and int(anchors.sum()) <= 1:  # it arrived alone (or runs alone)
        is_forced[0] = anchored = True
    forced = np.flatnonzero(is_forced)
    forced_rows = int(rows[forced].sum())
    room = max_rows - forced_rows
    free = np.flatnonzero(backlog.joinable & ~is_forced)  # ascending: arrival order
    if room <= 0 or not len(free):
        return [int(i) for i in forced]
    free = free[np.argsort(sizes[free], kind="stable")]  # size order, ties oldest first
    free_sizes = sizes[free]
    longest = int(sizes[forced].max()) if len(forced) else 0
    forced_real = int((sizes[forced] * rows[forced]).sum())
    # prefix sums over the size-sorted free parcels: rows, real elements, anchors
    rows_upto = np.concatenate(([0], np.cumsum(rows[free])))
    real_upto = np.concatenate(([0], np.cumsum(free_sizes * rows[free])))
    anchors_upto = None if anchored else np.concatenate(([0], np.cumsum(anchors[free])))
    if free_sizes[0] == free_sizes[-1] and longest <= free_sizes[0] and anchored:
        start = 0  # all alike: every run wastes the same, the first holds the oldest
    else:
        start = _least_waste(free, free_sizes, rows_upto, real_upto, room, forced_rows,
                             longest, forced_real, anchors_upto)  # fmt: skip
    end = _run_end(rows_upto, start, room)
    run = free[start:end]
    first = int(np.concatenate((forced[:1], run)).min())  # the batch's oldest parcel
    nearness = np.abs(sizes[run] - sizes[first])
    run = run[np.lexsort((run, nearness))]  # nearest to the oldest in it first, then the oldest
    return [int(i) for i in forced] + [int(i) for i in run]


def _run_end(rows_upto: Column, start: int, room: int) -> int:
    """The end (exclusive) of the run from ``start`` that fills ``room`` rows:
    whole parcels, at least one."""
    end = int(np.searchsorted(rows_upto, rows_upto[start] + room, side="left"))
    return max(start + 1, min(len(rows_upto) - 1, end))


def _least_waste(
    free: Column,
    free_sizes: Column,
    rows_upto: Column,
    real_upto: Column,
    room: int,
    forced_rows: int,
    longest: int,
    forced_real: int,
    anchors_upto: Column | None = None,
) -> int:
    """The start, in ``free`` (size order), of the run that fills ``room``
    rows wasting the fewest padded elements; among equals the oldest run
    (the one holding the oldest parcel). ``anchors_upto`` (prefix counts of
    the oldest arrivals in size order): only runs holding one of them."""
    count = len(free)
    ends = np.searchsorted(rows_upto, rows_upto[:-1] + room, side="left")
    ends = np.maximum(np.arange(1, count + 1), np.minimum(count, ends))
    # a start after the first run reaching the end only holds fewer rows
    last = int(np.argmax(ends == count))
    starts = np.arange(last + 1)
    ends = ends[: last + 1]
    held = forced_rows + rows_upto[ends] - rows_upto[starts]
    pad_to = np.maximum(longest, free_sizes[ends - 1])
    waste = held * pad_to - forced_real - (real_upto[ends] - real_upto[starts])
    if anchors_upto is not None:
        waste = np.where(anchors_upto[ends] > anchors_upto[starts], waste, np.iinfo(np.int64).max)
    best = np.flatnonzero(waste == waste.min())
    if len(best) == 1:
        return int(best[0])
    return int(min(best, key=lambda s: (int(free[s : ends[s]].min()), int(s))))


def padding_share(padded: int, real: int) -> float:
    """Elements computed over the elements requested (1.0: no padding)."""
    return padded / real if real else 1.0
