"""Benchmark references, each run as its own process by ``tensorq bench``:

python -m producer.reference inprocess --model F --spec JSON --batch B --threads T
    the TorchScript model called in-process on batches of B rows; prints items/s
python -m producer.reference bare --redis URL --stream K --count N
    the bare transport consumer: XREADGROUP COUNT 256 -> pipelined SET + XACK,
    no model, no decode; pushes its finish time when it has consumed N entries
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from common.spec import ModelSpec

BARE_GROUP = "bench"


def run_inprocess(
    model_path: str, spec_json: str, batch: int, threads: int, seconds: float
) -> float:
    import torch

    from producer.loadgen import random_inputs

    torch.set_num_threads(threads)
    spec = ModelSpec.from_json(spec_json)
    module = torch.jit.load(model_path)  # type: ignore[no-untyped-call]
    module.eval()
    arrays = random_inputs(spec.inputs, batch, np.random.default_rng(0), max_len=16)
    tensors = [torch.from_numpy(arrays[t.name]) for t in spec.inputs]
    with torch.inference_mode():
        for _ in range(3):  # warm-up
            module(*tensors)
        calls = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            module(*tensors)
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
    parser = argparse.ArgumentParser(prog="python -m producer.reference")
    verbs = parser.add_subparsers(dest="verb", required=True)
    inproc = verbs.add_parser("inprocess")
    inproc.add_argument("--model", required=True)
    inproc.add_argument("--spec", required=True)
    inproc.add_argument("--batch", type=int, required=True)
    inproc.add_argument("--threads", type=int, required=True)
    inproc.add_argument("--seconds", type=float, default=3.0)
    bare = verbs.add_parser("bare")
    bare.add_argument("--redis", required=True)
    bare.add_argument("--stream", required=True)
    bare.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    if args.verb == "inprocess":
        rate = run_inprocess(args.model, args.spec, args.batch, args.threads, args.seconds)
        print(json.dumps({"items_per_s": rate}))
    else:
        run_bare_consumer(args.redis, args.stream, args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
