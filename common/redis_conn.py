"""Redis connections: one pooled client per process, plus one dedicated
connection per blocking reader (a blocking read must not hold a pool slot,
and its socket timeout must outlast its BLOCK).

Start-up failures become ``RedisUnavailable`` naming the URL with the
password masked; the password never reaches a message or a log line.

With ``RedisSettings.is_cluster`` (a ``redis+cluster://h1:p1,h2:p2`` URL or
``cluster = true``) the same functions return ``redis.asyncio.RedisCluster``
clients. They are typed as ``Redis``: both speak the same command API, and
the few places that differ (transactions spanning slots, pub/sub) ask
``is_cluster`` themselves.
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TimeoutError,
)

from common.errors import RedisUnavailable
from common.redis_url import check_url, mask_url
from common.settings import RedisSettings

# Retried transparently by redis-py, with jittered exponential backoff.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (ConnectionError, TimeoutError)


def cluster_nodes(settings: RedisSettings) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The startup nodes and credentials of ``redis+cluster://[user:password@]h1:p1,h2:p2``
    (``rediss+cluster`` for TLS) or, with ``cluster = true``, of a plain URL naming one node."""
    check_url(settings.url, cluster=True)
    scheme, _, rest = settings.url.partition("://")
    userinfo, _, hosts = rest.partition("/")[0].rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes = []
    for host_port in hosts.split(","):
        parts = urlsplit(f"//{host_port.strip()}")
        nodes.append((parts.hostname or "localhost", parts.port or 6379))
    options: dict[str, Any] = {
        "username": unquote(username) or None,
        "password": unquote(password) or None,
        "socket_connect_timeout": settings.connect_timeout_s,
    }
    if scheme.startswith("rediss"):
        options["ssl"] = True
    return nodes, options


class _Cluster(RedisCluster):
    """redis-py's cluster client, raising the ConnectionError it means when a
    node drops out mid-command. While the topology changes, redis-py 8.1 can
    fail with AttributeError on a connection or node it has just discarded
    (redis/redis-py#3835; seen here during a failover: 'NoneType' object has
    no attribute 'writelines'), or with SlotNotCoveredError while a slot has
    no master; neither is a RedisError, so no caller's retry would catch them."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except (AttributeError, SlotNotCoveredError) as exc:
            raise ConnectionError(f"cluster node lost mid-command ({exc})") from exc

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]


class _ClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except (AttributeError, SlotNotCoveredError) as exc:
            raise ConnectionError(f"cluster node lost mid-pipeline ({exc})") from exc


def cluster_client(
    settings: RedisSettings, *, socket_timeout: float, retry: Retry | None = None
) -> aioredis.Redis:
    """A RedisCluster (see ``cluster_nodes``). Connections are per node;
    redis-py's cluster pool cannot wait for a free one, so ``max_connections``
    bounds each node's pool and a burst past it raises."""
    nodes, options = cluster_nodes(settings)
    cluster = _Cluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        max_connections=settings.max_connections,
        socket_timeout=socket_timeout,
        retry=retry or _retry(),
        **options,
    )
    return cast(aioredis.Redis, cluster)


def sync_client(settings: RedisSettings) -> redis.Redis:
    """A blocking client, for the few synchronous callers (the local stack,
    test fixtures): a ``redis.cluster.RedisCluster`` on Cluster."""
    check_url(settings.url, cluster=settings.is_cluster)
    if not settings.is_cluster:
        return redis.Redis.from_url(
            settings.url,
            socket_timeout=settings.socket_timeout_s,
            socket_connect_timeout=settings.connect_timeout_s,
        )
    from redis.cluster import ClusterNode as SyncClusterNode
    from redis.cluster import RedisCluster as SyncRedisCluster

    nodes, options = cluster_nodes(settings)
    cluster = SyncRedisCluster(
        startup_nodes=[SyncClusterNode(host, port) for host, port in nodes],  # type: ignore[no-untyped-call]
        socket_timeout=settings.socket_timeout_s,
        **options,
    )
    return cast(redis.Redis, cluster)


def _retry() -> Retry:
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), retries=5)


def pooled_client(settings: RedisSettings) -> aioredis.Redis:
    """The process's shared client: a blocking pool, so a burst waits for a
    connection instead of failing with 'Too many connections'."""
    check_url(settings.url, cluster=settings.is_cluster)
    if settings.is_cluster:
        return cluster_client(settings, socket_timeout=settings.socket_timeout_s)
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
    """A single-connection client for one blocking reader (XREADGROUP/BLMPOP);
    on Cluster a client of its own, so the read holds no shared pool slot.

    Never retried transparently: a read whose reply was lost has already
    moved entries (delivered to us, popped from an inbox), and only its
    caller knows how to recover them (re-read its own pending entries, sweep
    stored results). redis-py's cluster client resends a command after a
    connection error, which would hide the loss (until the visibility
    timeout); the single-node client does not by default, and is told so."""
    check_url(settings.url, cluster=settings.is_cluster)
    socket_timeout = block_ms / 1000 + settings.socket_timeout_s
    if settings.is_cluster:
        return cluster_client(settings, socket_timeout=socket_timeout, retry=_no_retry())
    return aioredis.Redis.from_url(
        settings.url,
        single_connection_client=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=settings.connect_timeout_s,
        retry=_no_retry(),
    )


def _no_retry() -> Retry:
    return Retry(NoBackoff(), retries=0)


async def check_reachable(client: aioredis.Redis, url: str) -> None:
    """PING once; raise RedisUnavailable with a masked URL on any failure."""
    try:
        await client.ping()
    except AuthenticationError:
        raise RedisUnavailable(f"Redis at {mask_url(url)} refused the credentials") from None
    except (RedisError, RedisClusterException) as exc:
        reason = str(exc).replace(url, mask_url(url))
        raise RedisUnavailable(f"cannot reach Redis at {mask_url(url)}: {reason}") from None
