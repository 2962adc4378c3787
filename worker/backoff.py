"""Exponential backoff with full jitter for the worker's reconnect loops."""

from __future__ import annotations

import asyncio
import logging
import random

from common.aio import wait_any

log = logging.getLogger(__name__)


class Backoff:
    def __init__(self, base: float = 0.05, cap: float = 5.0) -> None:
        self.base, self.cap, self.attempts = base, cap, 0

    def reset(self) -> None:
        self.attempts = 0

    async def wait(self, what: str, exc: Exception, stop: asyncio.Event | None = None) -> None:
        """Log and sleep before the next attempt; a set ``stop`` cuts the sleep short."""
        delay = random.uniform(0, min(self.cap, self.base * 2**self.attempts))
        self.attempts += 1
        log.warning("%s failed (%s); retry %d in %.2fs", what, exc, self.attempts, delay)
        if stop is None:
            await asyncio.sleep(delay)
            return
        await wait_any(stop, timeout=delay)
