"""Lua scripts run by SHA: ``LuaScript`` loads a script once per client and
sends EVALSHA, loading it again when Redis answers NOSCRIPT (a restart or
SCRIPT FLUSH emptied its cache). The one place that handles NOSCRIPT."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError


class LuaScript:
    def __init__(self, source: str) -> None:
        self.source = source
        # The SHA is a pure function of the source: no round trip to learn it.
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def load(self, redis: aioredis.Redis) -> None:
        """Load the script (on a cluster: on every primary, redis-py's default)."""
        await redis.script_load(self.source)

    async def run(
        self,
        redis: aioredis.Redis,
        keys: Sequence[Any],
        args: Sequence[Any],
        call: Callable[[Awaitable[Any]], Awaitable[Any]] | None = None,
    ) -> Any:
        """EVALSHA; on NOSCRIPT load it and send once more. ``call`` wraps each
        round trip (a client turning RedisError into its own error type)."""
        wrap = call or _plain
        try:
            return await wrap(redis.evalsha(self.sha, len(keys), *keys, *args))
        except NoScriptError:
            await wrap(self.load(redis))
            return await wrap(redis.evalsha(self.sha, len(keys), *keys, *args))

    def queue(self, pipe: Any, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Queue an EVALSHA on a pipeline; the caller loads the script first
        (``load``) or retries the pipeline after NoScriptError."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)


async def _plain(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
