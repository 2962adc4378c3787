"""Which stream entries this worker holds: read (or answered at once) and
not yet acknowledged. The reader takes entries, the writer releases them
once their results are written, and upkeep renews their lease so a long
batch is not reclaimed by another worker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from common.aio import wait_any


class Leases:
    def __init__(self) -> None:
        self._held: dict[str, set[bytes]] = {}
        self._released = asyncio.Event()  # set on every release; waiters clear it

    def hold(self, queue: str, entry_ids: Iterable[bytes]) -> None:
        self._held.setdefault(queue, set()).update(entry_ids)

    def release(self, queue: str, entry_ids: Iterable[bytes]) -> None:
        held = self._held.get(queue)
        if held is not None:
            held.difference_update(entry_ids)
        self._released.set()

    async def wait_released(self, queue: str, entry_id: bytes, stop: asyncio.Event) -> None:
        """Until ``entry_id`` is released (its result written) or ``stop``."""
        while self.holds(queue, entry_id) and not stop.is_set():
            self._released.clear()
            await wait_any(self._released, stop)

    def holds(self, queue: str, entry_id: bytes) -> bool:
        return entry_id in self._held.get(queue, ())

    def held(self) -> dict[str, list[bytes]]:
        """A snapshot per stream (for lease renewal)."""
        return {queue: list(ids) for queue, ids in self._held.items() if ids}
