"""Which stream entries this worker holds: read (or answered at once) and
not yet acknowledged, with how many of each entry's requests (a bundle holds
many) are still unanswered. The reader takes entries, the writer counts
their answers and releases each once all of its requests are written (only
then is it acked), and upkeep renews their lease so a long batch is not
reclaimed by another worker."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from common.aio import wait_any


class Leases:
    def __init__(self) -> None:
        # queue -> entry -> [its requests, how many are unanswered]
        self._held: dict[str, dict[bytes, list[int]]] = {}
        self._released = asyncio.Event()  # set on every release; waiters clear it

    def hold(self, queue: str, entry_id: bytes, requests: int = 1) -> None:
        self._held.setdefault(queue, {})[entry_id] = [requests, requests]

    def answer(self, queue: str, entry_id: bytes, requests: int) -> int | None:
        """Count ``requests`` of an entry answered. When that was the last of
        them, the entry's request count (its ack may go with these answers),
        else None. An entry not held counts as one request, answered now."""
        counts = self._held.get(queue, {}).get(entry_id)
        if counts is None:
            return 1
        counts[1] -= requests
        return counts[0] if counts[1] <= 0 else None

    def release(self, queue: str, entry_ids: Iterable[bytes]) -> None:
        held = self._held.get(queue)
        if held is not None:
            for entry_id in entry_ids:
                held.pop(entry_id, None)
        self._released.set()

    async def wait_released(self, queue: str, entry_id: bytes, stop: asyncio.Event) -> None:
        """Until ``entry_id`` is released (its results written) or ``stop``."""
        while self.holds(queue, entry_id) and not stop.is_set():
            self._released.clear()
            await wait_any(self._released, stop)

    def holds(self, queue: str, entry_id: bytes) -> bool:
        return entry_id in self._held.get(queue, ())

    def held(self) -> dict[str, list[bytes]]:
        """A snapshot per stream (for lease renewal)."""
        return {queue: list(ids) for queue, ids in self._held.items() if ids}
