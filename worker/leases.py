"""Which stream entries this worker holds: read (or answered at once) and
not yet acknowledged. The reader takes entries, the writer releases them
once their results are written, and upkeep renews their lease so a long
batch is not reclaimed by another worker."""

from __future__ import annotations

from collections.abc import Iterable


class Leases:
    def __init__(self) -> None:
        self._held: dict[str, set[bytes]] = {}

    def hold(self, queue: str, entry_ids: Iterable[bytes]) -> None:
        self._held.setdefault(queue, set()).update(entry_ids)

    def release(self, queue: str, entry_ids: Iterable[bytes]) -> None:
        held = self._held.get(queue)
        if held is not None:
            held.difference_update(entry_ids)

    def holds(self, queue: str, entry_id: bytes) -> bool:
        return entry_id in self._held.get(queue, ())

    def held(self) -> dict[str, list[bytes]]:
        """A snapshot per stream (for lease renewal)."""
        return {queue: list(ids) for queue, ids in self._held.items() if ids}
