"""Retry pacing, written once: exponential backoff with full jitter for
reconnect loops (``Backoff``), and a growing poll interval for loops that
wait on state in Redis (``Poll``).

Every loop that retries Redis or polls it uses one of these, so the pace,
the cap and the log line are the same everywhere.
"""

from __future__ import annotations

import asyncio
import logging
import random

from common.aio import wait_any

log = logging.getLogger(__name__)


class Backoff:
    """``await backoff.wait(what, exc)`` after a failure; ``reset()`` after a success."""

    def __init__(self, base: float = 0.05, cap: float = 5.0) -> None:
        self.base, self.cap, self.attempts = base, cap, 0

    def reset(self) -> None:
        self.attempts = 0

    def next_delay(self) -> float:
        """The next sleep (full jitter), counting one more attempt."""
        delay = random.uniform(0, min(self.cap, self.base * 2**self.attempts))
        self.attempts += 1
        return delay

    async def wait(self, what: str, exc: BaseException, stop: asyncio.Event | None = None) -> None:
        """Log and sleep before the next attempt; a set ``stop`` cuts the sleep short."""
        delay = self.next_delay()
        log.warning("%s failed (%s); retry %d in %.2fs", what, exc, self.attempts, delay)
        if stop is None:
            await asyncio.sleep(delay)
            return
        await wait_any(stop, timeout=delay)


class Poll:
    """Intervals for polling state: ``first``, doubling up to ``cap``.

    ``poll.next()`` gives the next interval; ``reset()`` starts over (after
    progress). Deterministic: polling is pacing, not contention."""

    def __init__(self, first: float = 0.01, cap: float = 0.25, factor: float = 2.0) -> None:
        self.first, self.cap, self.factor = first, cap, factor
        self._delay = first

    def reset(self) -> None:
        self._delay = self.first

    def next(self) -> float:
        delay = self._delay
        self._delay = min(self._delay * self.factor, self.cap)
        return delay

    async def sleep(self) -> None:
        await asyncio.sleep(self.next())
