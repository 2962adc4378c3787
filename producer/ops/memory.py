"""``tensorq status``'s "Redis memory" block: ``INFO memory`` and how many
per-request keys Redis holds (stored results, cancel and accepted marks,
inboxes) with the results' memory.

The count is exact while one SCAN pass over the keyspace fits in a time
budget (``SCAN_BUDGET_S``; about a million keys a second on loopback) and an
estimate past it: the share of each kind among the keys scanned, times
``DBSIZE``. The results' memory is ``MEMORY USAGE`` of a few of them (plus
what it leaves out per key) times their count, always an estimate. Only the
CLI calls this: the gateway's status scrape never pays for the scan.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from common.keys import Keys
from common.redis_conn import check_reachable, pooled_client
from common.settings import Settings

SCAN_BUDGET_S = 1.0
SCAN_COUNT = 1000
SIZE_SAMPLES = 16  # MEMORY USAGE calls for the size of one result
# What MEMORY USAGE leaves out of a key with a TTL (its expiry entry, table
# slots): measured as used_memory per key minus MEMORY USAGE, Redis 7.0.
KEY_OVERHEAD = 70

# kind -> what a key of it looks like, for the report
KINDS = {
    "results": "r",
    "cancel_marks": "cancel",
    "accepted_marks": "acc",
    "inboxes": "inbox",
}


async def collect_redis_memory(
    settings: Settings, *, redis: aioredis.Redis | None = None, budget_s: float = SCAN_BUDGET_S
) -> dict[str, Any]:
    """``used_memory`` (summed over the primaries on Redis Cluster), the
    key count, and per kind of per-request key its count; results also
    their memory. ``exact`` False: the counts are estimates."""
    keys = Keys.of(settings.redis)
    given = redis
    redis = given or pooled_client(settings.redis)
    try:
        await check_reachable(redis, settings.redis.url)
        info = await _memory_info(redis, keys.cluster)
        total: int = await redis.dbsize()
        prefixes = {kind: f"{keys.prefix}:{part}:".encode() for kind, part in KINDS.items()}
        counts = dict.fromkeys(KINDS, 0)
        samples: list[bytes] = []
        scanned, exact = 0, True
        deadline = time.monotonic() + budget_s
        async for key in redis.scan_iter(count=SCAN_COUNT):
            scanned += 1
            for kind, prefix in prefixes.items():
                if key.startswith(prefix):
                    counts[kind] += 1
                    if kind == "results" and len(samples) < SIZE_SAMPLES:
                        samples.append(key)
                    break
            if scanned % SCAN_COUNT == 0 and time.monotonic() > deadline:
                exact = False
                break
        if not exact and scanned:
            counts = {kind: round(n * total / scanned) for kind, n in counts.items()}
        sizes = [await redis.memory_usage(key) or 0 for key in samples]
        result_bytes = sum(sizes) / len(sizes) + KEY_OVERHEAD if sizes else 0.0
        return {
            "used_memory": info["used_memory"],
            "maxmemory": info["maxmemory"],
            "maxmemory_policy": info["maxmemory_policy"],
            "keys": total,
            "scanned": scanned,
            "exact": exact,
            **counts,
            "result_bytes_each": round(result_bytes),
            "results_memory": round(result_bytes * counts["results"]),
        }
    finally:
        if given is None:
            await redis.aclose()


async def _memory_info(redis: aioredis.Redis, cluster: bool) -> dict[str, Any]:
    if not cluster:
        raw: Any = await redis.info("memory")
        return {k: raw.get(k, 0) for k in ("used_memory", "maxmemory", "maxmemory_policy")}
    # a cluster client sends INFO to one node; ask every primary and add up
    per_node: Any = await redis.info(  # type: ignore[call-arg]
        "memory", target_nodes=aioredis.RedisCluster.PRIMARIES
    )
    nodes = list(per_node.values())
    return {
        "used_memory": sum(int(n.get("used_memory", 0)) for n in nodes),
        "maxmemory": sum(int(n.get("maxmemory", 0)) for n in nodes),
        "maxmemory_policy": nodes[0].get("maxmemory_policy", "") if nodes else "",
    }


def _mb(value: float) -> str:
    return f"{value / 1e6:,.1f} MB"


def format_redis_memory(report: dict[str, Any]) -> str:
    """The "Redis memory" block of ``tensorq status``."""
    limit = _mb(report["maxmemory"]) if report["maxmemory"] else "no maxmemory"
    how = "exact" if report["exact"] else f"estimate from {report['scanned']:,} keys scanned"
    lines = [
        f"redis memory: used {_mb(report['used_memory'])} ({limit}, "
        f"{report['maxmemory_policy'] or '?'}), {report['keys']:,} keys",
        f"  stored results   {report['results']:>12,}  ~{_mb(report['results_memory'])} "
        f"(~{report['result_bytes_each']:,} B each; counts {how})",
        f"  cancel marks     {report['cancel_marks']:>12,}",
        f"  accepted marks   {report['accepted_marks']:>12,}",
        f"  inboxes          {report['inboxes']:>12,}",
    ]
    return "\n".join(lines)
