"""``tensorq bench --soak N``: memory at steady state. N one-row requests go
through a local pool (``local_stack``, as ``tensorq bench`` starts it) with
``submit_many`` in chunks, every result awaited, a few chunks in flight.
At intervals it prints the workers' RSS (the pool's descendants), this
client's RSS and Redis ``used_memory``, and at the end the growth of each
from the first interval to the last; then it waits for the TTLs and shows
Redis back against where it started.

The run's ``result_ttl_s`` is ``--soak-ttl`` (so the TTL window fills within
the run) and the collected results' TTL a quarter of it: every result here
is collected, so Redis holds about rate x that TTL of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from common.aio import run
from common.runtime_env import MALLOC_ENV
from common.settings import Settings
from producer.bench.loadgen import random_inputs
from producer.client import AsyncClient, Submission
from producer.ops.memory import collect_redis_memory
from producer.ops.stack import ensure_example_models, local_stack

CHUNK = 2000  # requests per submit_many
IN_FLIGHT = 4  # chunks submitted ahead of the one being awaited: the pool never idles
PAYLOADS = 256  # distinct inputs, cycled: the load generator itself must not grow
SETTLE_MARGIN_S = 30.0  # past the longest TTL, how long the end waits for keys to expire
SMALL_KEYSPACE = 1000  # keys past the start's count below which the results are counted


@dataclass(frozen=True)
class Sample:
    requests: int
    elapsed_s: float
    rate: float  # requests/s since the previous sample
    workers_rss: int
    client_rss: int
    redis_used: int
    keys: int

    @property
    def held_s(self) -> float:
        """Seconds of traffic Redis holds at this rate: what stays flat when
        Redis does, whatever the rate (it moves with the machine's load)."""
        return self.keys / self.rate if self.rate else 0.0

    def line(self) -> str:
        return (
            f"{self.requests:>10,} {self.elapsed_s:>8.1f} {self.rate:>9,.0f} "
            f"{self.workers_rss / 1e6:>11.1f} {self.client_rss / 1e6:>10.1f} "
            f"{self.redis_used / 1e6:>10.1f} {self.keys:>10,} {self.held_s:>7.1f}"
        )


HEADER = (
    f"{'requests':>10} {'s':>8} {'req/s':>9} {'workers MB':>11} {'client MB':>10} "
    f"{'redis MB':>10} {'keys':>10} {'held s':>7}"
)


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children of any of its threads), from /proc."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            found += children
            todo += children
    return found


def run_soak(args: argparse.Namespace, settings: Settings) -> int:
    if args.soak < 1 or args.soak_ttl < 1:
        print(f"tensorq bench: --soak {args.soak} --soak-ttl {args.soak_ttl}: "
              "both must be integers >= 1")  # fmt: skip
        return 2
    ttl = args.soak_ttl
    collected = min(settings.redis.collected_result_ttl_s, max(1, ttl // 4))
    redis = replace(settings.redis, result_ttl_s=ttl, collected_result_ttl_s=collected)
    settings = settings.replace(redis=redis, worker=replace(settings.worker, threads=args.threads))
    ensure_example_models(settings)
    model = settings.model(args.model)
    env = {
        **MALLOC_ENV,
        "TQ_WORKER_THREADS": str(args.threads),
        "TQ_REDIS_RESULT_TTL_S": str(ttl),  # the workers store results for the run's TTL
    }
    every = max(10_000, min(100_000, args.soak // 10))
    print(
        f"tensorq bench --soak: model {model.name}, {args.soak:,} requests x 1 row, "
        f"devices {args.devices}, chunks of {CHUNK:,} ({IN_FLIGHT + 1} in flight); "
        f"result_ttl_s {ttl}, collected_result_ttl_s {collected}; a line every {every:,}",
        flush=True,
    )
    with local_stack(settings, devices=args.devices, extra_env=env) as stack:
        os.nice(args.producer_nice)  # as tensorq bench: the load generator yields the CPU
        figures = run(_soak(stack.redis_url, settings, args, stack.pool.pid, every))
    _report(figures, collected)
    if args.json:
        print(json.dumps(figures, indent=2))
    return 1 if figures["errors"] else 0


async def _soak(
    url: str, settings: Settings, args: argparse.Namespace, pool_pid: int, every: int
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    samples: list[Sample] = []
    async with AsyncClient(url, settings=settings) as client:
        redis = client.redis
        spec = await client.spec(args.model)
        payloads = [random_inputs(spec.inputs, 1, rng) for _ in range(PAYLOADS)]
        start_used, start_keys = await _used_memory(redis), int(await redis.dbsize())
        print(f"redis before the run: {start_used / 1e6:.1f} MB, {start_keys} keys", flush=True)
        print(HEADER, flush=True)
        window: deque[list[str]] = deque()
        sent = done = errors = 0
        mark = every
        started = last_time = time.perf_counter()
        last_done = 0
        while done < args.soak:
            while sent < args.soak and len(window) <= IN_FLIGHT:
                size = min(CHUNK, args.soak - sent)
                chunk = [
                    Submission(args.model, payloads[(sent + i) % PAYLOADS]) for i in range(size)
                ]
                window.append(await client.submit_many(chunk))
                sent += size
            for request_id in window.popleft():
                if (await client.wait(request_id, timeout=300)).status != "ok":
                    errors += 1
                done += 1
            if done >= mark or done == args.soak:
                now = time.perf_counter()
                sample = Sample(
                    done,
                    now - started,
                    (done - last_done) / max(now - last_time, 1e-9),
                    sum(rss_bytes(p) for p in descendants(pool_pid)),
                    rss_bytes(os.getpid()),
                    await _used_memory(redis),
                    int(await redis.dbsize()),
                )
                samples.append(sample)
                print(sample.line(), flush=True)
                last_done, last_time = done, now
                mark += every
        elapsed = time.perf_counter() - started
        # The TTLs: wait until no stored result is left (the run also leaves a
        # stream counter and this client's id mark, which are not per request).
        deadline = time.monotonic() + settings.redis.result_ttl_s + SETTLE_MARGIN_S
        waited = time.monotonic()
        while await _results_left(redis, settings, start_keys) and time.monotonic() < deadline:
            await asyncio.sleep(1.0)  # the pace of looks at an expiring keyspace
        keys = int(await redis.dbsize())
        end_used = await _used_memory(redis)
        settled_s = time.monotonic() - waited
    return {
        "requests": args.soak,
        "errors": errors,
        "elapsed_s": elapsed,
        "items_per_s": args.soak / elapsed,
        "samples": [s.__dict__ for s in samples],
        "redis_start_used": start_used,
        "redis_start_keys": start_keys,
        "redis_end_used": end_used,
        "redis_end_keys": keys,
        "settled_s": settled_s,
    }


async def _results_left(redis: aioredis.Redis, settings: Settings, start_keys: int) -> bool:
    """Whether Redis still holds stored results: by DBSIZE while there are
    many keys, by a (then short) exact count once there are few."""
    if int(await redis.dbsize()) > start_keys + SMALL_KEYSPACE:
        return True
    report = await collect_redis_memory(settings, redis=redis)
    return bool(report["results"]) or not report["exact"]


async def _used_memory(redis: aioredis.Redis) -> int:
    info: Any = await redis.info("memory")
    return int(info["used_memory"])


def growth(first: float, last: float) -> float:
    """Percent change from ``first`` to ``last``."""
    return 100.0 * (last - first) / first if first else 0.0


def _report(f: dict[str, Any], collected: int) -> None:
    samples = [Sample(**s) for s in f["samples"]]
    first, last = samples[0], samples[-1]
    # Redis is judged once the window of collected results is full (twice its TTL in)
    full = next((s for s in samples if s.elapsed_s >= 2 * collected), last)
    after = samples[samples.index(full) :]
    f["growth_pct"] = {
        "workers_rss": growth(first.workers_rss, last.workers_rss),
        "client_rss": growth(first.client_rss, last.client_rss),
        "redis_used": growth(first.redis_used, last.redis_used),
        "redis_used_window_full": growth(full.redis_used, last.redis_used),
        "redis_held_s_window_full": growth(full.held_s, last.held_s),
    }
    f["redis_used_window_full_range"] = [min(s.redis_used for s in after),
                                         max(s.redis_used for s in after)]  # fmt: skip
    g = f["growth_pct"]
    low, high = f["redis_used_window_full_range"]
    print(
        f"  {f['requests']:,} requests in {f['elapsed_s']:.0f} s ({f['items_per_s']:,.0f}/s), "
        f"{f['errors']} not ok\n"
        f"  growth from {first.requests:,} to {last.requests:,} requests: workers RSS "
        f"{g['workers_rss']:+.1f}%, client RSS {g['client_rss']:+.1f}%, Redis used_memory "
        f"{g['redis_used']:+.1f}% ({g['redis_used_window_full']:+.1f}% from {full.requests:,}, "
        f"once the {collected} s window of collected results is full: {low / 1e6:.1f} to "
        f"{high / 1e6:.1f} MB as the rate moved; seconds of traffic held "
        f"{g['redis_held_s_window_full']:+.1f}%)\n"
        f"  after the TTLs ({f['settled_s']:.0f} s): Redis used_memory "
        f"{f['redis_end_used'] / 1e6:.1f} MB, {f['redis_end_keys']} keys "
        f"(before the run: {f['redis_start_used'] / 1e6:.1f} MB, {f['redis_start_keys']} keys; "
        f"{growth(f['redis_start_used'], f['redis_end_used']):+.1f}%)",
        flush=True,
    )
