"""asyncio helpers shared by workers, clients and the gateway: ``wait_any``,
``run`` / ``new_event_loop`` (uvloop where installed, else asyncio), and
``settle_gc`` for servers.

Background loops here stop by flag, not by cancel: in Python 3.11 a cancel
that lands just as an inner ``asyncio.wait_for`` completes (redis-py wraps
every socket write in one) is lost, and a loop that lost it never ends.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def wait_any(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Wait until one of ``events`` is set, or ``timeout`` seconds pass."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    _, pending = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where uvloop is installed (it is not on Windows),
    else asyncio's own: the one place that chooses."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop ``new_event_loop`` chooses."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


# The young generation's threshold for servers that make short-lived objects
# per request (CPython's default is 700: a collection every few requests).
GC_YOUNG_THRESHOLD = 20_000


def settle_gc() -> None:
    """For a long-running server once it is set up: what exists now (imports,
    the app, models) is never collected again, and young collections come
    less often, so request latency does not wait on the collector as much."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def describe_tasks() -> str:
    """One line per running task of this loop: its name and where it waits
    (for a drain that takes too long)."""
    waiting = []
    for task in asyncio.all_tasks():
        where = []
        awaited: Any = task.get_coro()
        while awaited is not None and hasattr(awaited, "cr_frame"):
            if awaited.cr_frame is not None:
                where.append(f"{awaited.__qualname__}:{awaited.cr_frame.f_lineno}")
            awaited = awaited.cr_await
        if awaited is not None:
            where.append(type(awaited).__name__)
        state = f" (cancelling x{task.cancelling()})" if task.cancelling() else ""
        waiting.append(f"  {task.get_name()}{state}: {' > '.join(where)}")
    return "\n".join(sorted(waiting))
