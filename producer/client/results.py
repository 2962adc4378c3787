"""Reading results: ``outputs_of`` turns a result envelope into numpy outputs
or the typed error it stands for; ``get_stored`` and ``poll_stored`` read
``tq:r:<id>``, where any client finds a result by id (only a client's own
requests are pushed to its inbox)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from common.backoff import Poll
from common.codec import CodecLimits, bf16_bits_to_float32
from common.envelope import Result, unpack_result
from common.errors import InferenceError, RequestTimeout

DEFAULT_TIMEOUT_S = 30.0

# How long a wait that timed out still looks for a stored result.
STORED_LOOK_S = 1.0


def outputs_of(result: Result) -> dict[str, np.ndarray[Any, Any]]:
    """A result's outputs for users, or the typed error it stands for."""
    if result.status == "ok":
        return {
            name: bf16_bits_to_float32(a) if a.dtype == np.uint16 else a
            for name, a in result.outputs.items()
        }
    if result.status == "expired":
        raise RequestTimeout(result.error_message or "request expired", request_id=result.id)
    raise InferenceError(
        result.error_message or result.status,
        code=result.error_code or result.status,
        request_id=result.id,
    )


async def get_stored(
    redis: aioredis.Redis, key: str, limits: CodecLimits, within_s: float
) -> Result | None:
    """The stored result, or None if there is none or Redis does not answer
    within ``within_s`` (a stalled Redis must not stretch a caller's timeout
    by the client's retries)."""
    try:
        async with asyncio.timeout(max(within_s, 0.05)):
            raw: Any = await redis.get(key)
    except (RedisError, TimeoutError):
        return None
    return unpack_result(raw, limits) if raw else None


async def poll_stored(
    redis: aioredis.Redis, key: str, limits: CodecLimits, request_id: str, timeout: float | None
) -> Result:
    """Read ``key`` until the result is there, at growing intervals;
    ``RequestTimeout`` after ``timeout`` seconds."""
    deadline = None if timeout is None else time.monotonic() + timeout
    poll = Poll(first=0.005, cap=0.25)
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        stored = await get_stored(redis, key, limits, STORED_LOOK_S if left is None else left)
        if stored is not None:
            return stored
        delay = poll.next()
        if deadline is not None and time.monotonic() + delay > deadline:
            raise RequestTimeout(f"no result within {timeout}s", request_id=request_id)
        await asyncio.sleep(delay)
