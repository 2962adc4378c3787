"""``tensorq bench``: tensorq's throughput and latency against two references
measured in the same run on the same machine, printed as ratios:

(a) the model called in-process on batches of the size the pool formed, one
    process per worker slot with the same thread count and malloc settings;
(b) the bare Redis transport: XADD -> XREADGROUP COUNT 256 -> pipelined
    SET + XACK, no model, no decode, with the same payload size.

Both references run as their own processes (``producer.bench.reference``).
Throughput is measured open-loop (all requests submitted in pipelined chunks,
then every result awaited), as is the bare transport; latency closed-loop
with M concurrent producers; idle overhead with one request at a time.
``--http`` measures the gateway instead (``producer.bench.http``), and
``--report`` sweeps offered load (``producer.bench.report``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from typing import Any

import numpy as np

from common.aio import run
from common.devices import parse_devices
from common.envelope import Request, pack_request
from common.runtime_env import MALLOC_ENV
from common.settings import Settings
from producer.bench.cpu_account import cpu_by_role, format_cpu, per_request_us
from producer.bench.loadgen import random_inputs, run_load
from producer.bench.reference import CHUNK, bare_transport, inprocess_rate
from producer.client import AsyncClient, Submission
from producer.ops.stack import ensure_example_models, local_stack


def run_bench(args: argparse.Namespace, settings: Settings) -> int:
    settings = settings.replace(worker=replace(settings.worker, threads=args.threads))
    ensure_example_models(settings)
    model = settings.model(args.model)
    slots = parse_devices(args.devices, threads=args.threads)
    env = {**MALLOC_ENV, "TQ_WORKER_THREADS": str(args.threads)}
    print(
        f"tensorq bench: model {model.name}, {args.requests} requests x {args.rows} row(s), "
        f"devices {args.devices} ({len(slots)} worker(s) x {args.threads} thread(s))",
        flush=True,
    )
    with local_stack(settings, devices=args.devices, extra_env=env) as stack:
        # The load generator stands in for producers on other machines: on a
        # small box it yields the CPU to the system under test (workers, Redis
        # and the references keep normal priority).
        os.nice(args.producer_nice)
        figures = run(_measure(stack.redis_url, settings, args))
        figures["bare_items_per_s"] = run(
            bare_transport(stack.redis_url, figures["payload_bytes"], args.requests)
        )
    batch = max(1, round(figures["mean_batch_rows"]))
    figures["inprocess_batch"] = batch
    figures["worker_slots"] = len(slots)
    figures["devices"] = args.devices
    figures["inprocess_items_per_s"] = inprocess_rate(
        str(model.path), figures["spec_json"], batch, args.threads, slots
    )
    _report(figures)
    if args.json:
        print(json.dumps({k: v for k, v in figures.items() if k != "spec_json"}, indent=2))
    return 0


async def _measure(url: str, settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    async with AsyncClient(url, settings=settings) as client:
        spec = await client.spec(args.model)
        payloads = [random_inputs(spec.inputs, args.rows, rng) for _ in range(args.requests)]
        # warm-up: let every worker see traffic before the clock starts
        await _open_loop(client, args.model, payloads[: min(2000, len(payloads))])
        cpu_before = cpu_by_role()
        throughput, mean_batch, compute = await _open_loop(client, args.model, payloads)
        cpu = per_request_us(cpu_before, cpu_by_role(), len(payloads) * args.rows)
        cpu_before = cpu_by_role()
        inbox_only, _, _ = await _open_loop(client, args.model, payloads, store=False)
        cpu_inbox = per_request_us(cpu_before, cpu_by_role(), len(payloads) * args.rows)
        closed = await run_load(
            client,
            args.model,
            lambda i: payloads[i],
            requests=min(len(payloads), 10 * args.concurrency * 10),
            concurrency=args.concurrency,
        )
        idle = []
        for payload in payloads[:200]:
            t0 = time.perf_counter()
            result = await client.wait(await client.submit(args.model, payload))
            idle.append((time.perf_counter() - t0) * 1000 - result.infer_ms)
    request = Request("x" * 32, args.model, dict(payloads[0]), reply_to="tq:inbox:x")
    return {
        "model": args.model,
        "rows_per_request": args.rows,
        "items_per_s": throughput,
        "inbox_only_items_per_s": inbox_only,
        "cpu_us_per_item_inbox_only": cpu_inbox,
        "mean_batch_rows": mean_batch,
        "closed_loop_items_per_s": closed.items_per_s,
        "concurrency": args.concurrency,
        "p50_ms": closed.p50_ms,
        "p99_ms": closed.p99_ms,
        "idle_overhead_p50_ms": float(np.percentile(idle, 50)),
        "idle_overhead_p99_ms": float(np.percentile(idle, 99)),
        "payload_bytes": len(pack_request(request)),
        "cpu_us_per_item": cpu,
        **compute,
        "spec_json": spec.to_json(),
    }


async def _open_loop(
    client: AsyncClient, model: str, payloads: list[Any], *, store: bool = True
) -> tuple[float, float, dict[str, float]]:
    """Submit everything in pipelined chunks, then await every result
    (``store``: each result kept by id too, as ``submit`` does by default).

    Returns items/s, the mean batch rows and where the workers' time went:
    the mean forward time of a batch and the share of the run each worker's
    compute thread spent in forward (a batch is told apart by its worker
    and its infer_ms, which every result of the batch carries)."""
    start = time.perf_counter()
    ids: list[str] = []
    for i in range(0, len(payloads), CHUNK):
        chunk = payloads[i : i + CHUNK]
        ids += await client.submit_many([Submission(model, p, store=store) for p in chunk])
    results = [await client.wait(i, timeout=300) for i in ids]
    elapsed = time.perf_counter() - start
    rows = sum((r.outputs and next(iter(r.outputs.values())).shape[0]) or 0 for r in results)
    batches = {(r.worker, r.infer_ms) for r in results}
    workers = len({worker for worker, _ in batches}) or 1
    compute = {
        "batch_infer_ms": float(np.mean([ms for _, ms in batches])),
        "compute_busy": sum(ms for _, ms in batches) / 1000 / elapsed / workers,
    }
    return rows / elapsed, float(np.mean([r.batch_size for r in results])), compute


def _report(f: dict[str, Any]) -> None:
    ratio_a = f["items_per_s"] / f["inprocess_items_per_s"]
    ratio_b = f["items_per_s"] / f["bare_items_per_s"]
    ratio_inbox = f["inbox_only_items_per_s"] / f["bare_items_per_s"]
    ratio_closed = f["closed_loop_items_per_s"] / f["bare_items_per_s"]
    per_slot = f["inprocess_items_per_s"] / f["worker_slots"]
    in_process_ms = 1000 * f["inprocess_batch"] / per_slot
    print(
        f"  tensorq throughput (open loop)   {f['items_per_s']:>10,.0f} items/s"
        f"   mean batch {f['mean_batch_rows']:.1f} rows   tensorq/bare = {ratio_b:.2f}\n"
        f"    the same, results to the inbox only (store=False) "
        f"{f['inbox_only_items_per_s']:,.0f} items/s   tensorq/bare = {ratio_inbox:.2f}\n"
        f"  tensorq {f['concurrency']} producers awaiting infer() "
        f"{f['closed_loop_items_per_s']:>8,.0f} items/s   p50 {f['p50_ms']:.2f} ms"
        f"   p99 {f['p99_ms']:.2f} ms   tensorq/bare = {ratio_closed:.2f}\n"
        f"  idle single request              overhead over compute p50 "
        f"{f['idle_overhead_p50_ms']:.2f} ms, p99 {f['idle_overhead_p99_ms']:.2f} ms\n"
        f"  (a) model in-process, batch {f['inprocess_batch']:<4} "
        f"{f['inprocess_items_per_s']:>10,.0f} items/s   tensorq/in-process = {ratio_a:.2f}\n"
        f"  (b) bare Redis round trip        {f['bare_items_per_s']:>10,.0f} items/s"
        f"   tensorq/bare = {ratio_b:.2f}   ({f['payload_bytes']} B payloads)\n"
        f"  worker compute thread: forward {f['batch_infer_ms']:.2f} ms per batch "
        f"(in-process {in_process_ms:.2f} ms), busy {f['compute_busy']:.2f} of the run\n"
        f"  CPU per item (open loop): {format_cpu(f['cpu_us_per_item'])}\n"
        f"  CPU per item (open loop, inbox only): "
        f"{format_cpu(f['cpu_us_per_item_inbox_only'])}",
        flush=True,
    )
    f["ratio_inprocess"] = ratio_a
    f["ratio_bare"] = ratio_b
    f["ratio_bare_inbox_only"] = ratio_inbox
    f["ratio_bare_infer_concurrent"] = ratio_closed
