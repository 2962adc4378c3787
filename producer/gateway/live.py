"""Which models a live worker serves, as the gateway knows it without a
Redis round trip per request: a view of ``tq:workers`` read at start-up and
every ``REFRESH_S`` in the background (workers beat every ``heartbeat_s``
and count as live for ``LIVE_WITHIN_MS``, common/records.py).

Readiness and the sync-infer check read the view. A "no" is confirmed by a
fresh read first (concurrent callers share it), so a worker that has just
come up is never refused because the view is a second old; only the refusal
path, taken when no worker serves the model, costs a round trip.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from common.aio import wait_any
from common.keys import Keys
from common.records import live_workers
from common.redis_url import mask_url

log = logging.getLogger(__name__)

REFRESH_S = 1.0  # how often the view is re-read
STALE_S = 5.0  # a view older than this (reads failing or stuck) does not count


class LiveView:
    def __init__(self, redis: aioredis.Redis, keys: Keys, url: str) -> None:
        self._redis = redis
        self._keys = keys
        self._url = url
        self.serving: Counter[str] = Counter()  # model -> live workers serving it
        self.workers = 0  # live workers
        self.error = "workers not read yet"  # why the view cannot be trusted; "" when it can
        self._read_at = float("-inf")  # monotonic time the last good read started
        self._started = float("-inf")  # monotonic time the last read started
        self._lock = asyncio.Lock()

    # -- reading ----------------------------------------------------------------

    async def fresh(self) -> None:
        """A read of ``tq:workers`` that started after this call (callers
        waiting at the same time share one)."""
        asked = time.monotonic()
        async with self._lock:
            if self._started >= asked:  # a read started after we asked, and is done
                return
            await self._read()

    async def _read(self) -> None:
        self._started = started = time.monotonic()
        try:
            raw: Any = await self._redis.hgetall(self._keys.workers)
        except RedisError as exc:
            self.error = f"Redis at {mask_url(self._url)}: {exc}"
            return
        live = live_workers(raw)
        self.serving = Counter(model for worker in live for model in set(worker.models))
        self.workers = len(live)
        self.error = ""
        self._read_at = started

    async def run(self, stop: asyncio.Event) -> None:
        """Re-read every ``REFRESH_S`` until ``stop``."""
        while not stop.is_set():
            await wait_any(stop, timeout=REFRESH_S)
            if not stop.is_set():
                async with self._lock:
                    await self._read()

    # -- answers ----------------------------------------------------------------

    def problem(self, model: str | None = None) -> str:
        """Why the view says "not ready" (for ``model``, or for any model); "" if ready."""
        if self.error:
            return self.error
        age = time.monotonic() - self._read_at
        if age > STALE_S:
            return f"no current view of the workers (last read {age:.0f}s ago)"
        if model is None:
            return "" if self.workers else "no live worker"
        if self.serving[model]:
            return ""
        return f"no live worker serves model {model!r} ({self.workers} live worker(s))"

    async def confirmed_problem(self, model: str | None = None) -> str:
        """``problem``, confirmed by a fresh read when there is one."""
        if not self.problem(model):
            return ""
        await self.fresh()
        return self.problem(model)

    async def unserved(self, model: str) -> str:
        """Why a sync request for ``model`` would only wait out its timeout:
        a fresh view says no live worker serves it. "" when it may be
        served (a worker serves it, or the view cannot tell: then the
        request goes on, and Redis answers for itself)."""
        if self.serving[model] or self.error:
            return ""
        await self.fresh()
        if self.serving[model] or self.error:
            return ""
        return f"no live worker serves model {model!r} ({self.workers} live worker(s))"


LIVE = web.AppKey("live", LiveView)
