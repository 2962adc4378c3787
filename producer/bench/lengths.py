"""``tensorq bench`` for a model with a variable input axis: the mixed-length
workload. One-row requests with lengths uniform in ``--lengths LOW,HIGH``
are all submitted at once (``submit_many``), then every result is awaited;
the same requests run in-process on the model in batches of
``max_batch_size``, in arrival order and sorted by length (the best a
batcher could do knowing every request in advance), and in the very batches
the pool formed (so the pool's own cost shows apart from its batching), in
the same run: pool and in-process runs take turns, each side's best of
``--rounds`` (default 5) counts. Each prints requests/s and its padding
share: elements computed on the variable axis over the requests' own (1.0:
no padding).

``run_orders`` is the in-process side; it runs in its own process
(``python -m producer.bench.reference lengths``), so the producer never
imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from common.aio import run
from common.codec import WIRE_DTYPES
from common.devices import parse_devices
from common.runtime_env import MALLOC_ENV
from common.settings import Settings
from common.spec import ModelSpec, TensorSpec
from producer.bench.cpu_account import cpu_by_role, format_cpu, per_request_us
from producer.bench.loadgen import random_inputs
from producer.bench.reference import per_slot
from producer.client import AsyncClient, Submission
from producer.ops.stack import ensure_example_models, local_stack

SEED = 0
DEFAULT_REQUESTS = 2000
# in-process orders: arrival, sorted by length, and the batches tensorq formed
ORDERS = ("arrival", "sorted", "tensorq")
IDLE_REQUESTS = 100  # after each burst, one at a time


def mixed_lengths(count: int, low: int, high: int, seed: int = SEED) -> list[int]:
    return [int(n) for n in np.random.default_rng(seed).integers(low, high + 1, count)]


def mixed_payloads(
    inputs: Sequence[TensorSpec], lengths: Sequence[int], seed: int = SEED
) -> list[dict[str, np.ndarray[Any, Any]]]:
    """One one-row request per length (the same arrays for the same seed)."""
    rng = np.random.default_rng(seed + 1)
    return [random_inputs(inputs, 1, rng, length=n) for n in lengths]


def padding_share(batches: Sequence[Sequence[int]]) -> float:
    """Elements computed over real ones for batches of these one-row lengths."""
    real = sum(sum(b) for b in batches)
    return sum(len(b) * max(b) for b in batches) / real if real else 1.0


def run_length_bench(args: argparse.Namespace, settings: Settings) -> int:
    settings = settings.replace(worker=replace(settings.worker, threads=args.threads))
    ensure_example_models(settings)
    model = settings.model(args.model)
    slots = parse_devices(args.devices, threads=args.threads)
    low, high = args.lengths
    lengths = mixed_lengths(args.requests or DEFAULT_REQUESTS, low, high)
    env = {**MALLOC_ENV, "TQ_WORKER_THREADS": str(args.threads)}
    print(
        f"tensorq bench: model {model.name}, {len(lengths)} one-row requests, lengths "
        f"{low}..{high} uniform, max_batch_size {model.max_batch_size}, group_by_length "
        f"{'on' if model.group_by_length else 'off'}, devices {args.devices} "
        f"({len(slots)} worker(s) x {args.threads} thread(s))",
        flush=True,
    )
    rounds = []
    with local_stack(settings, devices=args.devices, extra_env=env) as stack:
        os.nice(args.producer_nice)  # the load generator yields to the pool (see pool.py)
        for _ in range(args.rounds):  # alternated, so that drift hits both sides alike
            pool = run(_measure(stack.redis_url, settings, model.name, lengths))
            own = ";".join(",".join(map(str, b)) for b in pool.pop("batches"))
            verb = ["lengths", "--model", str(model.path), "--spec", pool.pop("spec_json"),
                    "--lengths", ",".join(map(str, lengths)), "--batches", own]  # fmt: skip
            rounds.append((pool, per_slot(verb, args.threads, slots)))
    figures = dict(max((pool for pool, _ in rounds), key=lambda f: f["items_per_s"]))
    figures["rounds"] = len(rounds)
    for order in ORDERS:
        best = max(
            (refs for _, refs in rounds),
            key=lambda refs: sum(r[order]["items_per_s"] for r in refs),
        )
        figures[f"{order}_items_per_s"] = sum(r[order]["items_per_s"] for r in best)
        figures[f"{order}_padding_share"] = best[0][order]["padding_share"]
    # each round's pool against the references run right after it
    for order, key in (("sorted", "round_ratios_sorted"), ("tensorq", "round_ratios_own")):
        figures[key] = sorted(
            pool["items_per_s"] / sum(r[order]["items_per_s"] for r in refs)
            for pool, refs in rounds
        )
    _report(figures)
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0


async def _measure(
    url: str, settings: Settings, model: str, lengths: Sequence[int]
) -> dict[str, Any]:
    async with AsyncClient(url, settings=settings) as client:
        spec = await client.spec(model)
        payloads = mixed_payloads(spec.inputs, lengths)
        warm = mixed_payloads(spec.inputs, lengths[: 2 * spec.max_batch_size], seed=SEED + 7)
        await _burst(client, model, warm)
        cpu_before = cpu_by_role()
        start = time.perf_counter()
        results = await _burst(client, model, payloads)
        elapsed = time.perf_counter() - start
        cpu = per_request_us(cpu_before, cpu_by_role(), len(payloads))
        idle = []  # one request at a time: what the pool adds to a lone forward
        for payload in payloads[:IDLE_REQUESTS]:
            t0 = time.perf_counter()
            result = await client.wait(await client.submit(model, payload))
            idle.append((time.perf_counter() - t0) * 1000 - result.infer_ms)
    batches: dict[tuple[str, float], list[int]] = defaultdict(list)  # request indices
    for index, result in enumerate(results):
        batches[(result.worker, result.infer_ms)].append(index)  # a batch shares both
    workers = len({worker for worker, _ in batches}) or 1
    return {
        "model": model,
        "requests": len(lengths),
        "items_per_s": len(lengths) / elapsed,
        # the share of the run each worker's compute thread spent in forward
        "compute_busy": sum(ms for _, ms in batches) / 1000 / elapsed / workers,
        "padding_share": padding_share([[lengths[i] for i in b] for b in batches.values()]),
        "batches": list(batches.values()),
        "mean_batch_rows": float(np.mean([r.batch_size for r in results])),
        "cpu_us_per_request": cpu,
        # forward time per request, the part of the workers' CPU the model itself takes
        "forward_us_per_request": sum(ms for _, ms in batches) * 1000 / len(lengths),
        "idle_overhead_p50_ms": float(np.percentile(idle, 50)),
        "idle_overhead_p99_ms": float(np.percentile(idle, 99)),
        "spec_json": spec.to_json(),
    }


async def _burst(client: AsyncClient, model: str, payloads: Sequence[Any]) -> list[Any]:
    ids = await client.submit_many([Submission(model, p, store=False) for p in payloads])
    results = [await client.wait(i, timeout=600) for i in ids]
    failed = [r for r in results if r.status != "ok"]
    if failed:
        raise SystemExit(f"tensorq bench: {len(failed)} requests failed: {failed[0].error_message}")
    return results


def _report(f: dict[str, Any]) -> None:
    print(
        f"  tensorq (submit_many, then wait)   {f['items_per_s']:>8,.1f} requests/s   padding "
        f"{f['padding_share']:.2f}x   mean batch {f['mean_batch_rows']:.1f} rows   "
        f"forward busy {f['compute_busy']:.2f} of the run\n"
        f"  CPU per request (us, by process)   {format_cpu(f['cpu_us_per_request'])}; "
        f"of which forward {f['forward_us_per_request']:,.0f}\n"
        f"  idle single request                overhead over compute p50 "
        f"{f['idle_overhead_p50_ms']:.2f} ms, p99 {f['idle_overhead_p99_ms']:.2f} ms\n"
        f"  in-process, arrival order          {f['arrival_items_per_s']:>8,.1f} requests/s   "
        f"padding {f['arrival_padding_share']:.2f}x   "
        f"tensorq/arrival = {f['items_per_s'] / f['arrival_items_per_s']:.2f}\n"
        f"  in-process, sorted by length       {f['sorted_items_per_s']:>8,.1f} requests/s   "
        f"padding {f['sorted_padding_share']:.2f}x   "
        f"tensorq/sorted = {f['items_per_s'] / f['sorted_items_per_s']:.2f}\n"
        f"  in-process, tensorq's batches      {f['tensorq_items_per_s']:>8,.1f} requests/s   "
        f"padding {f['tensorq_padding_share']:.2f}x   "
        f"tensorq/its batches = {f['items_per_s'] / f['tensorq_items_per_s']:.2f} "
        "(the pool's own cost)\n"
        f"  best of {f['rounds']} rounds each, pool and in-process taking turns; tensorq/sorted "
        f"round by round: {' '.join(f'{r:.2f}' for r in f['round_ratios_sorted'])}; "
        f"tensorq/its batches: {' '.join(f'{r:.2f}' for r in f['round_ratios_own'])}",
        flush=True,
    )
    f["ratio_arrival"] = f["items_per_s"] / f["arrival_items_per_s"]
    f["ratio_sorted"] = f["items_per_s"] / f["sorted_items_per_s"]
    f["ratio_own_batches"] = f["items_per_s"] / f["tensorq_items_per_s"]


# -- the in-process side (its own process) -----------------------------------


def padded_batch(
    spec: ModelSpec, members: Sequence[dict[str, np.ndarray[Any, Any]]]
) -> list[np.ndarray[Any, Any]]:
    """The members stacked, each variable axis padded with its pad value."""
    arrays = []
    for tensor in spec.inputs:
        parts = [m[tensor.name] for m in members]
        longest = tuple(max(p.shape[1 + i] for p in parts) for i in range(len(tensor.shape)))
        out = np.full((len(parts), *longest), tensor.pad_value, dtype=WIRE_DTYPES[tensor.dtype])
        for row, part in enumerate(parts):
            out[(slice(row, row + 1), *map(slice, part.shape[1:]))] = part
        arrays.append(out)
    return arrays


def run_orders(
    model_path: str,
    spec_json: str,
    lengths: Sequence[int],
    threads: int,
    device: str,
    formed: Sequence[Sequence[int]] = (),
) -> dict[str, dict[str, float]]:
    """The requests in batches of max_batch_size, in arrival order and sorted
    by length, and (``formed``, request indices) in the batches tensorq made;
    inputs padded before the clock starts; every order warmed up by one
    untimed run, then one timed run of each (``run_length_bench`` alternates
    these with the pool's runs)."""
    import torch

    torch.set_num_threads(threads)
    spec = ModelSpec.from_json(spec_json)
    module = torch.jit.load(model_path, map_location=device)  # type: ignore[no-untyped-call]
    module.eval()
    payloads = mixed_payloads(spec.inputs, lengths)
    size = spec.max_batch_size
    by_order = {
        "arrival": list(range(len(lengths))),
        "sorted": sorted(range(len(lengths)), key=lengths.__getitem__),
    }
    orders = {
        name: [o[i : i + size] for i in range(0, len(o), size)] for name, o in by_order.items()
    }
    if formed:
        orders["tensorq"] = [list(b) for b in formed]
    prepared = {}
    shares = {}
    for name, groups in orders.items():
        shares[name] = padding_share([[lengths[i] for i in g] for g in groups])
        prepared[name] = [
            [torch.from_numpy(a) for a in padded_batch(spec, [payloads[i] for i in g])]
            for g in groups
        ]

    def once(batches: list[list[torch.Tensor]]) -> float:
        start = time.perf_counter()
        for inputs in batches:
            out = module(*(t.to(device) for t in inputs))
            for tensor in out if isinstance(out, tuple | list) else [out]:
                tensor.cpu()  # the worker copies every output back
        return time.perf_counter() - start

    with torch.inference_mode():
        # Every order once untimed: a batch shape's first forward runs up to
        # 30% slower (measured: sorted 994 requests/s on its first pass right
        # after the arrival order, 1,340 on later ones), and the pool, a
        # long-lived process, has seen these shapes in its earlier rounds.
        for batches in prepared.values():
            once(batches)
        seconds = {name: once(batches) for name, batches in prepared.items()}
    return {
        name: {"items_per_s": len(lengths) / seconds[name], "padding_share": shares[name]}
        for name in orders
    }
