"""Redis connections: one pooled client per process, plus one dedicated
connection per blocking reader (a blocking read must not hold a pool slot,
and its socket timeout must outlast its BLOCK).

Start-up failures become ``RedisUnavailable`` naming the URL with the
password masked; the password never reaches a message or a log line.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import AuthenticationError, ConnectionError, RedisError, TimeoutError

from common.errors import RedisUnavailable
from common.settings import RedisSettings

# Retried transparently by redis-py, with jittered exponential backoff.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (ConnectionError, TimeoutError)


def mask_url(url: str) -> str:
    """``redis://user:secret@host`` -> ``redis://user:***@host``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _retry() -> Retry:
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), retries=5)


def pooled_client(settings: RedisSettings) -> aioredis.Redis:
    """The process's shared client: a blocking pool, so a burst waits for a
    connection instead of failing with 'Too many connections'."""
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.url,
        max_connections=settings.max_connections,
        timeout=settings.socket_timeout_s,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        retry=_retry(),
        retry_on_error=list(TRANSIENT_ERRORS),
    )
    return aioredis.Redis(connection_pool=pool)


def blocking_client(settings: RedisSettings, block_ms: int) -> aioredis.Redis:
    """A single-connection client for one blocking reader (XREADGROUP/BLMPOP)."""
    return aioredis.Redis.from_url(
        settings.url,
        single_connection_client=True,
        socket_timeout=block_ms / 1000 + settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
    )


async def check_reachable(client: aioredis.Redis, url: str) -> None:
    """PING once; raise RedisUnavailable with a masked URL on any failure."""
    try:
        await client.ping()
    except AuthenticationError:
        raise RedisUnavailable(f"Redis at {mask_url(url)} refused the credentials") from None
    except RedisError as exc:
        reason = str(exc).replace(url, mask_url(url))
        raise RedisUnavailable(f"cannot reach Redis at {mask_url(url)}: {reason}") from None
