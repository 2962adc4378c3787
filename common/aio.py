"""asyncio helpers shared by workers, clients and the gateway.

Background loops here stop by flag, not by cancel: in Python 3.11 a cancel
that lands just as an inner ``asyncio.wait_for`` completes (redis-py wraps
every socket write in one) is lost, and a loop that lost it never ends.
"""

from __future__ import annotations

import asyncio


async def wait_any(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Wait until one of ``events`` is set, or ``timeout`` seconds pass."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    _, pending = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
