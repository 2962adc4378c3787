"""Reading results: ``outputs_of`` turns a result envelope into numpy outputs
or the typed error it stands for; ``get_stored`` and ``poll_stored`` read
``tq:r:<id>``, where any client finds a result by id (only a client's own
requests are pushed to its inbox)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
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


async def look_up(
    redis: aioredis.Redis,
    key: str,
    marks: Sequence[tuple[str, int]],
    limits: CodecLimits,
    within_s: float,
) -> tuple[Result | None, bool]:
    """The stored result at ``key``, and whether the request is known (its
    result exists, or one of its accepted ``marks`` vouches for it: see
    ``known``), in one round trip. If Redis does not answer within
    ``within_s``: (None, True), as it is not known to be unknown."""
    try:
        async with asyncio.timeout(max(within_s, 0.05)):
            async with redis.pipeline(transaction=False) as pipe:
                pipe.get(key)
                for mark, _ in marks:
                    pipe.get(mark)
                raw, *values = await pipe.execute()
    except (RedisError, TimeoutError):
        return None, True
    if raw:
        return unpack_result(raw, limits), True
    return None, any(known(value, least) for value, (_, least) in zip(values, marks, strict=True))


def known(value: bytes | None, least: int) -> bool:
    """Whether a mark read from Redis vouches for a request: it exists and,
    for a client's counter ``tq:sub:<client_id>`` (``least`` > 0), has
    reached ``least``, the request's own ``n``."""
    if value is None:
        return False
    if least <= 0:
        return True
    try:
        return int(value) >= least
    except ValueError:
        return True  # not ours to judge: not known to be unknown


async def poll_stored(
    redis: aioredis.Redis,
    key: str,
    limits: CodecLimits,
    request_id: str,
    timeout: float | None,
    *,
    since: float | None = None,
) -> Result:
    """Read ``key`` until the result is there, at growing intervals;
    ``RequestTimeout`` ``timeout`` seconds after ``since`` (a
    ``time.monotonic()``; default: now)."""
    start = time.monotonic() if since is None else since
    deadline = None if timeout is None else start + timeout
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
