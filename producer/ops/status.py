"""``tensorq status``: per model queued / pending / oldest pending age / dead
letters, per worker device / alive / batches / mean batch / last seen. The
same report feeds the gateway's ``/v1/status``, status page, readiness and
queue gauges."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common.keys import CONSUMER_GROUP, Keys
from common.records import WorkerHeartbeat, decode_heartbeats, now_ms
from common.redis_conn import check_reachable, pooled_client
from common.settings import Settings


async def collect_status(
    settings: Settings, *, redis: aioredis.Redis | None = None
) -> dict[str, Any]:
    """``redis`` shares a caller's client (the gateway's pool at scrape time);
    without it a client is opened and closed for this call."""
    keys = Keys.of(settings.redis)
    given = redis
    redis = given or pooled_client(settings.redis)
    try:
        await check_reachable(redis, settings.redis.url)
        models: dict[str, Any] = {}
        names: Any = await redis.hkeys(keys.models)
        for raw_name in sorted(names):
            name = raw_name.decode()
            length, pending, oldest_ms, requests = 0, 0, 0.0, 0
            for queue in keys.queues(name):
                entries = await redis.xlen(queue)
                length += entries
                counted = await redis.get(keys.queued(queue))  # bundles: many per entry
                requests += max(entries, int(counted or 0))
                try:
                    summary = await redis.xpending(queue, CONSUMER_GROUP)
                except ResponseError:  # no group yet
                    continue
                pending += int(summary["pending"])
                if summary["pending"]:
                    first = await redis.xpending_range(queue, CONSUMER_GROUP, "-", "+", 1)
                    if first:
                        oldest_ms = max(oldest_ms, float(first[0]["time_since_delivered"]))
            models[name] = {
                "queued": max(0, length - pending),
                "pending": pending,
                "requests": requests,  # held by the streams, queued and pending, bundles counted
                "oldest_pending_ms": oldest_ms,
                "dead_letters": await redis.xlen(keys.dead(name)),
            }
        now = now_ms()
        heartbeats = decode_heartbeats(await redis.hgetall(keys.workers))  # sorted by name
        live = [record for record in heartbeats if record.is_live(now)]
        for name, model in models.items():
            model.update(_last_minute(name, live))
        return {"models": models, "workers": [record.as_report(now) for record in heartbeats]}
    finally:
        if given is None:
            await redis.aclose()


def _last_minute(model: str, workers: list[WorkerHeartbeat]) -> dict[str, Any]:
    """Across live workers: rows/s summed, latency percentiles of the worst
    worker (percentiles do not add up), the sparkline summed per 5 s bucket,
    the padding share weighted by each worker's real elements (None: no
    padded batches in the last minute)."""
    minutes = [w.last_minute.get(model) for w in workers]
    present = [m for m in minutes if m]
    spark = [sum(m["spark"][i] for m in present) for i in range(12)]
    real = sum(m.get("real_elements", 0) for m in present)
    padded = sum(m.get("padding_share", 1.0) * m.get("real_elements", 0) for m in present)
    return {
        "rows_per_s_1m": round(sum(m["rows_per_s"] for m in present), 2),
        # variable-axis models: input elements computed (padding included) / requested
        "padding_share_1m": round(padded / real, 3) if real else None,
        "p50_ms_1m": max((m["p50_ms"] for m in present), default=0.0),
        "p99_ms_1m": max((m["p99_ms"] for m in present), default=0.0),
        "spark_1m": spark,
    }


def format_status(report: dict[str, Any]) -> str:
    lines = [
        f"{'model':<12}{'queued':>8}{'pending':>9}{'oldest ms':>11}{'dead':>7}"
        f"{'rows/s 1m':>11}{'p50 ms':>9}{'p99 ms':>9}{'padding':>9}"
    ]
    for name, m in report["models"].items():
        lines.append(
            f"{name:<12}{m['queued']:>8}{m['pending']:>9}"
            f"{m['oldest_pending_ms']:>11.0f}{m['dead_letters']:>7}"
            f"{m['rows_per_s_1m']:>11.1f}{m['p50_ms_1m']:>9.1f}{m['p99_ms_1m']:>9.1f}"
            f"{_share(m.get('padding_share_1m')):>9}"
        )
    lines.append("")
    lines.append(f"{'worker':<36}{'device':>8}{'alive':>7}{'batches':>9}{'mean':>7}{'seen':>7}")
    for w in report["workers"]:
        lines.append(
            f"{w['name']:<36}{w['device']:>8}{'yes' if w['alive'] else 'no':>7}"
            f"{w['batches']:>9}{w['mean_batch_rows']:>7.1f}{w['last_seen_s_ago']:>6.1f}s"
        )
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
