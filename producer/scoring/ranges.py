"""Row ranges: the set of completed rows a checkpoint keeps, and the fixed
chunk grid a run (and its resumption) sends requests on.

Ranges are half-open ``(start, stop)`` like Python slices. Chunks always lie
on the grid ``origin + k * size``, so a resumed run sends exactly the
requests an uninterrupted run would have sent for the rows still missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

Range = tuple[int, int]


class RangeSet:
    """Disjoint, sorted, merged half-open ranges."""

    def __init__(self, ranges: Iterable[Range] = ()) -> None:
        self._ranges: list[Range] = []
        for start, stop in ranges:
            self.add(start, stop)

    def add(self, start: int, stop: int) -> None:
        if stop <= start:
            return
        merged: list[Range] = []
        placed = False
        for lo, hi in self._ranges:
            if hi < start:
                merged.append((lo, hi))
            elif stop < lo:
                if not placed:
                    merged.append((start, stop))
                    placed = True
                merged.append((lo, hi))
            else:  # overlapping or touching: absorb
                start, stop = min(lo, start), max(hi, stop)
        if not placed:
            merged.append((start, stop))
        self._ranges = merged

    @property
    def ranges(self) -> list[Range]:
        return list(self._ranges)

    def total(self) -> int:
        return sum(hi - lo for lo, hi in self._ranges)

    def gaps(self, start: int, stop: int) -> list[Range]:
        """The parts of ``[start, stop)`` not in the set, in order."""
        gaps: list[Range] = []
        cursor = start
        for lo, hi in self._ranges:
            if hi <= cursor:
                continue
            if lo >= stop:
                break
            if lo > cursor:
                gaps.append((cursor, lo))
            cursor = max(cursor, hi)
        if cursor < stop:
            gaps.append((cursor, stop))
        return gaps

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and self._ranges == other._ranges

    def __repr__(self) -> str:
        return f"RangeSet({self._ranges})"


def chunk_grid(gaps: Iterable[Range], *, origin: int, size: int) -> Iterator[Range]:
    """Cut each gap at the grid lines ``origin + k * size``."""
    if size < 1:
        raise ValueError("chunk size must be >= 1")
    for start, stop in gaps:
        cursor = start
        while cursor < stop:
            line = origin + ((cursor - origin) // size + 1) * size
            end = min(line, stop)
            yield cursor, end
            cursor = end


def describe_rows(start: int, stop: int) -> str:
    """``rows 1280-1407`` (inclusive, for people)."""
    if stop - start == 1:
        return f"row {start}"
    return f"rows {start}-{stop - 1}"
