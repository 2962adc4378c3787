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

1. Forced first, oldest first: the oldest parcel (so nothing starves and
   arrival order still decides who is served next), every parcel passed
   over ``max_passed_over`` times already, and every parcel whose deadline
   is near (it would pass before the pass-over bound could be honoured).
2. The rest of the batch is the run of parcels, contiguous in size order,
   that wastes the fewest padded elements once padded to the longest of it
   and of the forced ones; among equal waste the oldest run, so uniform
   lengths keep arrival order exactly.
3. Within the batch, nearest in size to the oldest first: if the padded
   byte limit cuts the batch short, what it drops is the least alike.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """One parcel of the backlog, in arrival order."""

    size: int  # elements of one row, all inputs together
    rows: int
    forced: bool  # passed over too often, or its deadline is near
    joinable: bool = True  # False: a redelivered request, which runs alone


def batch_order(candidates: Sequence[Candidate], max_rows: int) -> list[int]:
    """Indices into ``candidates`` (arrival order, the oldest first) in the
    order the next batch should take them; enough for ``max_rows`` rows
    when the backlog holds them."""
    if not candidates:
        return []
    forced = [0] + [i for i in range(1, len(candidates)) if candidates[i].forced]
    forced_rows = sum(candidates[i].rows for i in forced)
    room = max_rows - forced_rows
    taken = set(forced)
    free = sorted(
        (c.size, i)
        for i, c in enumerate(candidates)
        if i not in taken and c.joinable
    )  # fmt: skip
    if room <= 0 or not free:
        return forced
    longest = max(candidates[i].size for i in forced)
    real = sum(candidates[i].size * candidates[i].rows for i in forced)
    # prefix sums over the size-sorted free parcels: rows and real elements
    rows_upto = [0]
    real_upto = [0]
    for size, i in free:
        rows_upto.append(rows_upto[-1] + candidates[i].rows)
        real_upto.append(real_upto[-1] + size * candidates[i].rows)
    if free[0][0] == free[-1][0]:
        start = 0  # all alike: every run wastes the same, the first is the oldest
    else:
        start = _least_waste(free, rows_upto, real_upto, room, forced_rows, longest, real)
    end = min(len(free), bisect.bisect_left(rows_upto, rows_upto[start] + room, lo=start + 1))
    pivot = candidates[0].size
    run = sorted(free[start:end], key=lambda p: (abs(p[0] - pivot), p[1]))
    return forced + [i for _, i in run]


def _least_waste(
    free: Sequence[tuple[int, int]],
    rows_upto: Sequence[int],
    real_upto: Sequence[int],
    room: int,
    forced_rows: int,
    longest: int,
    forced_real: int,
) -> int:
    """The start, in ``free`` (size order), of the run that fills ``room``
    rows wasting the fewest padded elements; among equals the oldest run."""
    best_waste, best_start, best_oldest = -1, 0, 0
    for start in range(len(free)):
        end = min(len(free), bisect.bisect_left(rows_upto, rows_upto[start] + room, lo=start + 1))
        rows = forced_rows + rows_upto[end] - rows_upto[start]
        pad_to = max(longest, free[end - 1][0])
        waste = rows * pad_to - forced_real - (real_upto[end] - real_upto[start])
        if best_waste < 0 or waste <= best_waste:
            oldest = min(i for _, i in free[start:end])
            if best_waste < 0 or waste < best_waste or oldest < best_oldest:
                best_waste, best_start, best_oldest = waste, start, oldest
        if end == len(free):
            break  # later starts only hold fewer rows
    return best_start


def padding_share(padded: int, real: int) -> float:
    """Elements computed over the elements requested (1.0: no padding)."""
    return padded / real if real else 1.0
