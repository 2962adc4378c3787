"""The worker's broadcast feed: cancelled request ids published on
``tq:cancelled``, kept in memory so the batcher checks a request without a
Redis round trip, and control messages on ``tq:control`` (model reloads).

Entries enqueued before the subscription was (re)established may have been
cancelled while nobody listened; ``listening_since_ms`` (Redis server time)
tells the reader which entries still need a key lookup.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.keys import Keys
from worker.backoff import Backoff

log = logging.getLogger(__name__)

MEMORY_S = 3600.0  # as long as a cancel key lives


class Feed:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        poll_s: float,
        on_control: Callable[[dict[str, Any]], None],
    ) -> None:
        self._on_control = on_control
        self._redis = redis
        self._keys = keys
        self._poll_s = poll_s
        self._cancelled: set[str] = set()
        self._expiry: deque[tuple[float, str]] = deque()  # in insertion = expiry order
        self.listening_since_ms = float("inf")

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._cancelled

    def add(self, request_id: str) -> None:
        self._cancelled.add(request_id)
        self._expiry.append((time.monotonic() + MEMORY_S, request_id))

    async def run(self, stop: asyncio.Event) -> None:
        """Subscribe until ``stop``, resubscribing with backoff on connection loss."""
        backoff = Backoff()
        while not stop.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.cancel_channel, self._keys.control_channel)
                seconds, micros = await self._redis.time()
                self.listening_since_ms = seconds * 1000 + micros / 1000
                backoff.reset()
                while not stop.is_set():
                    message = await pubsub.get_message(timeout=self._poll_s)
                    if message is None:
                        pass
                    elif message["channel"].decode() == self._keys.control_channel:
                        self._control(message["data"])
                    else:
                        self.add(message["data"].decode(errors="replace"))
                    self._forget_expired()
            except RedisError as exc:
                # Until resubscribed, every entry counts as possibly cancelled.
                self.listening_since_ms = float("inf")
                await backoff.wait("cancel subscription", exc, stop)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _control(self, data: bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            log.warning("ignoring unreadable control message %r", data[:100])
            return
        if isinstance(message, dict):
            self._on_control(message)

    def _forget_expired(self) -> None:
        now = time.monotonic()
        while self._expiry and self._expiry[0][0] < now:
            self._cancelled.discard(self._expiry.popleft()[1])
