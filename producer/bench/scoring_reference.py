"""In-process reference for ``tensorq bench-score``, run as its own process
(with the same thread count and malloc settings as a worker):

    python -m producer.bench.scoring_reference --model F.pt --input F.npy --batch B --threads T

reads the rows of a one-input .npy (memory-mapped) in batches of B, calls the
TorchScript model on each under ``inference_mode``, stores the outputs in an
array, and prints ``{"rows", "seconds", "rows_per_s"}`` as JSON. A few
batches run first, untimed, as warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np


def run_reference(model_path: str, input_path: str, batch: int, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    module = torch.jit.load(model_path)  # type: ignore[no-untyped-call]
    module.eval()
    rows = np.load(input_path, mmap_mode="r")
    total = rows.shape[0]
    with torch.inference_mode():
        for start in range(0, min(total, 3 * batch), batch):  # warm-up
            module(torch.from_numpy(np.array(rows[start : start + batch])))
        out: np.ndarray[Any, Any] | None = None
        began = time.perf_counter()
        for start in range(0, total, batch):
            result = module(torch.from_numpy(np.array(rows[start : start + batch]))).numpy()
            if out is None:
                out = np.empty((total, *result.shape[1:]), result.dtype)
            out[start : start + result.shape[0]] = result
        seconds = time.perf_counter() - began
    return {"rows": total, "seconds": seconds, "rows_per_s": total / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m producer.bench.scoring_reference")
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(run_reference(args.model, args.input, args.batch, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
