"""The references ``tensorq bench`` (and ``bench-score``) measure against,
each run as its own process, so the producer never imports torch:

python -m producer.bench.reference inprocess --model F --spec JSON --batch B --threads T --device D
    the TorchScript model called in-process on batches of B rows; prints items/s.
    On a GPU each call copies its inputs from pinned host memory to the
    device and its outputs back, as the worker does.
python -m producer.bench.reference lengths --model F --spec JSON --lengths 8,200,...
        [--batches 0,3;1,2;...] --threads T --device D
    the mixed-length reference (producer.bench.lengths): the same requests
    in batches of max_batch_size, in arrival order and sorted by length,
    and (--batches, request indices) in the batches the pool formed;
    prints requests/s and the padding share of each.
python -m producer.bench.reference bare --redis URL --stream K --count N
    the bare transport consumer: XREADGROUP COUNT 256 -> pipelined SET + XACK,
    no model, no decode; pushes its finish time when it has consumed N entries

``inprocess_rate`` and ``bare_transport`` start them and take their figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from common.devices import DeviceSlot
from common.keys import REQUEST_FIELD
from common.spec import ModelSpec

BARE_GROUP = "bench"
CHUNK = 256  # entries per pipelined round trip


def inprocess_rate(
    path: str, spec_json: str, batch: int, threads: int, slots: Sequence[DeviceSlot]
) -> float:
    """Reference (a): the model in-process, one process per worker slot,
    pinned as the worker of that slot is, run at the same time; items/s summed."""
    figures = per_slot(
        ["inprocess", "--model", path, "--spec", spec_json, "--batch", str(batch)], threads, slots
    )
    return float(sum(f["items_per_s"] for f in figures))


def per_slot(verb: Sequence[str], threads: int, slots: Sequence[DeviceSlot]) -> list[Any]:
    """Run ``python -m producer.bench.reference VERB...`` once per worker slot,
    pinned as that slot's worker is, all at the same time; their JSON figures."""
    procs = []
    for slot in slots:
        env = {**os.environ, **slot.environment(), "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "producer.bench.reference", *verb,
               "--threads", str(threads), "--device", slot.torch_device]  # fmt: skip
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, preexec_fn=normal_priority)
        )
    return [json.loads(proc.communicate(timeout=600)[0]) for proc in procs]


async def bare_transport(url: str, payload_bytes: int, count: int) -> float:
    """Reference (b): ``count`` payloads of ``payload_bytes`` through a bare
    stream consumer in its own process; items/s."""
    stream = "bench:bare"
    redis = aioredis.Redis.from_url(url)
    await redis.delete(stream, f"{stream}:done", f"{stream}:ready")
    await redis.xgroup_create(stream, BARE_GROUP, id="0", mkstream=True)
    consumer = subprocess.Popen(
        [sys.executable, "-m", "producer.bench.reference", "bare", "--redis", url,
         "--stream", stream, "--count", str(count)],
        preexec_fn=normal_priority,
    )  # fmt: skip
    await redis.blpop([f"{stream}:ready"], timeout=60)  # its start-up is not transport time
    payload = os.urandom(payload_bytes)
    start = time.perf_counter()
    for i in range(0, count, CHUNK):
        async with redis.pipeline(transaction=False) as pipe:
            for _ in range(min(CHUNK, count - i)):
                pipe.xadd(stream, {REQUEST_FIELD: payload})
            await pipe.execute()
    await redis.blpop([f"{stream}:done"], timeout=300)
    elapsed = time.perf_counter() - start
    consumer.wait(30)
    await redis.delete(stream)
    await redis.aclose()
    return count / elapsed


def normal_priority() -> None:
    """Undo the load generator's niceness in a reference or server process (root only)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, 0)


def run_inprocess(
    model_path: str, spec_json: str, batch: int, threads: int, seconds: float, device: str
) -> float:
    import torch

    from producer.bench.loadgen import random_inputs

    torch.set_num_threads(threads)
    spec = ModelSpec.from_json(spec_json)
    module = torch.jit.load(model_path, map_location=device)  # type: ignore[no-untyped-call]
    module.eval()
    arrays = random_inputs(spec.inputs, batch, np.random.default_rng(0), max_len=16)
    cuda = device.startswith("cuda")
    host = [torch.from_numpy(arrays[t.name]) for t in spec.inputs]
    if cuda:
        host = [t.pin_memory() for t in host]

    def call() -> None:
        out = module(*(t.to(device, non_blocking=cuda) for t in host))
        for tensor in out if isinstance(out, tuple | list) else [out]:
            tensor.cpu()  # the worker copies every output back (a sync on a GPU)

    with torch.inference_mode():
        for _ in range(3):  # warm-up
            call()
        calls = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            call()
            calls += 1
        elapsed = time.perf_counter() - start
    return calls * batch / elapsed


def run_bare_consumer(url: str, stream: str, count: int) -> None:
    import redis

    client = redis.Redis.from_url(url)
    client.lpush(f"{stream}:ready", b"1")
    consumed = 0
    while consumed < count:
        reply: Any = client.xreadgroup(BARE_GROUP, "c", {stream: ">"}, count=256, block=1000)
        if not reply:
            continue
        entries = reply[0][1]
        pipe = client.pipeline(transaction=False)
        for entry_id, fields in entries:
            pipe.set(b"bench:r:" + entry_id, fields[b"req"], ex=60)
        pipe.xack(stream, BARE_GROUP, *[e[0] for e in entries])
        pipe.execute()
        consumed += len(entries)
    client.lpush(f"{stream}:done", repr(time.perf_counter()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m producer.bench.reference")
    verbs = parser.add_subparsers(dest="verb", required=True)
    inproc = verbs.add_parser("inprocess")
    inproc.add_argument("--model", required=True)
    inproc.add_argument("--spec", required=True)
    inproc.add_argument("--batch", type=int, required=True)
    inproc.add_argument("--threads", type=int, required=True)
    inproc.add_argument("--seconds", type=float, default=3.0)
    inproc.add_argument("--device", default="cpu")
    lengths = verbs.add_parser("lengths")
    lengths.add_argument("--model", required=True)
    lengths.add_argument("--spec", required=True)
    lengths.add_argument("--lengths", required=True, help="comma-separated, one per request")
    lengths.add_argument("--batches", default="", help="request indices: 0,3;1,2;...")
    lengths.add_argument("--threads", type=int, required=True)
    lengths.add_argument("--device", default="cpu")
    bare = verbs.add_parser("bare")
    bare.add_argument("--redis", required=True)
    bare.add_argument("--stream", required=True)
    bare.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    if args.verb == "inprocess":
        rate = run_inprocess(
            args.model, args.spec, args.batch, args.threads, args.seconds, args.device
        )
        print(json.dumps({"items_per_s": rate}))
    elif args.verb == "lengths":
        from producer.bench.lengths import run_orders

        order_lengths = [int(n) for n in args.lengths.split(",")]
        formed = [[int(i) for i in b.split(",")] for b in args.batches.split(";") if b]
        figures = run_orders(
            args.model, args.spec, order_lengths, args.threads, args.device, formed
        )
        print(json.dumps(figures))
    else:
        run_bare_consumer(args.redis, args.stream, args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
