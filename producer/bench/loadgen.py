"""Load generation: closed loop (``run_load``: M concurrent producers, each
submitting a request and waiting for its result as ``infer`` does, N
requests in all) and open
loop (``run_rate``: requests sent at a fixed rate whatever the answers do),
with random inputs fitting a model (``random_inputs``). Used by the demo and
the benchmarks; reports items/s, latency percentiles and mean batch size."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from producer.client import AsyncClient, outputs_of

InputFactory = Callable[[int], Mapping[str, np.ndarray[Any, Any]]]


@dataclass(frozen=True)
class LoadReport:
    model: str
    requests: int
    rows: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_batch_rows: float
    errors: int

    @property
    def items_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (
            f"{self.model:>6}: {self.requests} requests, {self.rows} rows in {self.seconds:.2f}s "
            f"= {self.items_per_s:,.0f} items/s; latency p50 {self.p50_ms:.2f} ms, "
            f"p99 {self.p99_ms:.2f} ms; mean batch {self.mean_batch_rows:.1f} rows; "
            f"errors {self.errors}"
        )


async def run_load(
    client: AsyncClient,
    model: str,
    make_inputs: InputFactory,
    *,
    requests: int,
    concurrency: int,
    timeout: float = 60.0,
) -> LoadReport:
    """``make_inputs(i)`` builds request i; inputs are built before the clock starts."""
    payloads = [make_inputs(i) for i in range(requests)]
    latencies: list[float] = []
    batch_rows: list[int] = []
    rows = sum(int(next(iter(p.values())).shape[0]) for p in payloads)
    errors = 0
    next_index = 0

    async def producer() -> None:
        nonlocal next_index, errors
        while next_index < requests:
            i = next_index
            next_index += 1
            t0 = time.perf_counter()
            # what infer() does (kept as submit + wait for the result's timings)
            request_id = await client.submit(model, payloads[i], timeout=timeout, store=False)
            result = await client.wait(request_id, timeout)
            latencies.append((time.perf_counter() - t0) * 1000)
            batch_rows.append(result.batch_size)
            try:
                outputs_of(result)
            except Exception:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(producer() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    return _summary(model, requests, rows, seconds, latencies, batch_rows, errors)


def _summary(
    model: str,
    requests: int,
    rows: int,
    seconds: float,
    latencies: list[float],
    batch_rows: list[int],
    errors: int,
) -> LoadReport:
    lat = np.array(latencies or [0.0])
    return LoadReport(
        model=model,
        requests=requests,
        rows=rows,
        seconds=seconds,
        p50_ms=float(np.percentile(lat, 50)),
        p99_ms=float(np.percentile(lat, 99)),
        mean_batch_rows=float(np.mean(batch_rows or [0])),
        errors=errors,
    )


def random_inputs(
    spec_inputs: Any,
    rows: int,
    rng: np.random.Generator,
    *,
    max_len: int = 32,
    length: int | None = None,
) -> dict[str, np.ndarray[Any, Any]]:
    """Random tensors fitting a model's declared inputs (variable axes
    ``length`` long, or 1..max_len at random)."""
    from common.codec import WIRE_DTYPES

    arrays: dict[str, np.ndarray[Any, Any]] = {}
    if length is None:
        length = int(rng.integers(1, max_len + 1))
    for tensor in spec_inputs:
        shape = (rows, *(length if d < 0 else d for d in tensor.shape))
        dtype = WIRE_DTYPES[tensor.dtype]
        if tensor.dtype == "bool":
            arrays[tensor.name] = rng.integers(0, 2, shape).astype(bool)
        elif dtype.kind in "iu":
            arrays[tensor.name] = rng.integers(1, 100, shape).astype(dtype)
        else:
            arrays[tensor.name] = rng.standard_normal(shape).astype(dtype)
    return arrays


async def run_rate(
    client: AsyncClient,
    model: str,
    make_inputs: InputFactory,
    *,
    rate: float,
    seconds: float,
    timeout: float = 60.0,
) -> LoadReport:
    """Open loop: requests sent at ``rate`` per second for ``seconds`` whatever
    the answers do (offered load), each timed from send to result."""
    loop = asyncio.get_running_loop()
    count = max(1, int(rate * seconds))
    payloads = [make_inputs(i) for i in range(count)]
    latencies: list[float] = []
    batch_rows: list[int] = []
    errors = 0

    async def one(payload: Mapping[str, np.ndarray[Any, Any]]) -> None:
        nonlocal errors
        t0 = time.perf_counter()
        try:
            request_id = await client.submit(model, payload, store=False)  # as infer() does
            result = await client.wait(request_id, timeout)
            outputs_of(result)
        except Exception:
            errors += 1
            return
        latencies.append((time.perf_counter() - t0) * 1000)
        batch_rows.append(result.batch_size)

    start = loop.time()
    tasks = []
    for i, payload in enumerate(payloads):
        delay = start + i / rate - loop.time()
        if delay > 0:  # pacing the offered load, not waiting for a result
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(payload)))
    await asyncio.gather(*tasks)
    elapsed = loop.time() - start
    rows = sum(int(next(iter(p.values())).shape[0]) for p in payloads)
    return _summary(model, count, rows, elapsed, latencies, batch_rows, errors)
