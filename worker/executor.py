"""The executor: batches on one device. Assemble inputs (into pinned host
memory on CUDA), run ``forward`` under ``torch.inference_mode()`` in the
worker's single compute thread, map the outputs to the declared names, and
split them back per request into packed results. Every output is checked
after each forward: the batch's rows first, then each declared axis (a fixed
one at its size, a variable one at least the longest request, so it can be
cut back). A batch that raises, or whose outputs break that, is bisected so
only the culprit requests get a ``model_error``: an ``ok`` result is always
right in shape.

``start`` assembles on the event loop and hands the forward to the compute
thread (``compute``): the compute thread does nothing but the forward call,
which drops the GIL (and the shape check of its outputs, a few tuple
comparisons). Every other step of a batch holds the GIL, and in the compute thread
it would queue behind the event loop's Redis work (measured: assembling 32
CNN requests took 0.9 ms there, 0.25 ms of it CPU, the rest waiting for the
GIL); on the event loop it overlaps the running forward instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.bundle import pack_result_bundle
from common.codec import WIRE_DTYPES
from common.envelope import Arrays, Result, Timings, pack_ok_results, pack_result
from common.errors import ConfigError
from common.spec import ModelSpec
from worker.batching import Allocator, Assembled, assemble, check_output, split
from worker.registry import LoadedModel
from worker.work import Accepted, Batch, Outcome, fixed

_TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


# Pinned staging buffer sets used in turn: the batch computing, the one
# queued behind it, and the one being assembled (the worker's batch loop
# keeps at most two batches in flight).
STAGING_SETS = 3


class ModelFailure(Exception):
    """forward raised for one request even when run alone."""


@dataclass
class BatchRun:
    """What the compute thread hands back for one batch."""

    assembled: Assembled
    outputs: Arrays | None  # the whole batch's outputs when forward succeeded
    failed: list[Arrays | ModelFailure] | None  # per request (member), after bisecting a failure
    started_ms: float  # unix ms when compute began
    infer_ms: float

    @property
    def failures(self) -> int:
        """Requests of the batch that failed alone."""
        return sum(isinstance(f, ModelFailure) for f in self.failed or ())


class Executor:
    """Runs batches for one device: ``start`` and ``outcomes`` on the event
    loop, ``compute`` in the single compute thread (or inline, see ``start``)."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        # Growing pinned staging buffers per (set, input position), reused:
        # a set comes round again only after its batch ended with a
        # device->host copy (a sync), see STAGING_SETS.
        self._staging: dict[tuple[int, int], torch.Tensor] = {}  # (set, input) -> buffer
        self._set = 0

    def allocator(self) -> Allocator | None:
        """Pinned memory from the next staging set (CUDA), else None: plain numpy."""
        if not self.cuda:
            return None
        self._set = (self._set + 1) % STAGING_SETS
        staging_set, position = self._set, 0

        def allocate(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
            nonlocal position
            key = (staging_set, position)
            position += 1
            nbytes = int(np.prod(shape)) * dtype.itemsize
            buf = self._staging.get(key)
            if buf is None or buf.numel() < nbytes:
                buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
                self._staging[key] = buf
            return buf[:nbytes].numpy().view(dtype).reshape(shape)

        return allocate

    def assemble(self, model: LoadedModel, requests: Sequence[Arrays]) -> Assembled:
        """A batch's inputs, staged for the device. Called from one thread only
        (the event loop) because it cycles the staging sets."""
        allocate = self.allocator()
        return (
            assemble(model.spec, requests, allocate) if allocate else assemble(model.spec, requests)
        )

    def start(self, batch: Batch, *, inline: bool = False) -> asyncio.Future[BatchRun]:
        """Assemble ``batch`` here (the event loop) and compute it in the
        compute thread, or, ``inline`` on a CPU device, here and now: for a
        lone short batch there is nothing to overlap with its forward, and
        the two thread hand-offs cost a lone request about 0.3 ms (README,
        "Variable lengths")."""
        parts = [item.inputs for item in batch.items]  # a parcel's members are stacked already
        assembled = self.assemble(batch.model, parts)
        loop = asyncio.get_running_loop()
        if inline and not self.cuda:
            done: asyncio.Future[BatchRun] = loop.create_future()
            done.set_result(self.compute(batch, parts, assembled))
            return done
        return loop.run_in_executor(self._compute, self.compute, batch, parts, assembled)

    def outcomes(self, batch: Batch, run: BatchRun, worker: str) -> list[Outcome]:
        """Split a computed batch per parcel and pack its answers (event loop):
        one result bundle per parcel whose members share an inbox."""
        spec = batch.model.spec
        answer = Answering(spec, run, batch.rows, worker)
        if run.outputs is not None:
            per_parcel = split(spec, run.assembled, run.outputs)
            return [answer.ok(item, out) for item, out in zip(batch.items, per_parcel, strict=True)]
        failed = iter(run.failed or ())
        return [answer.each(item, [next(failed) for _ in item.ids]) for item in batch.items]

    def close(self) -> None:
        self._compute.shutdown(wait=True)

    def forward(self, model: LoadedModel, assembled: Assembled) -> Arrays:
        """One forward call on an assembled batch, its outputs checked against
        the declared ones (OutputMismatch: a model error, bisected like one)."""
        tensors = [_to_torch(a, t.dtype) for a, t in zip(assembled.inputs, model.spec.inputs,
                                                         strict=True)]  # fmt: skip
        if self.cuda:  # on CPU .to would be a no-op that still drops and retakes the GIL
            tensors = [t.to(self.device, non_blocking=True) for t in tensors]
        with torch.inference_mode():
            raw = model.module(*tensors)
        return _outputs_to_numpy(model.spec, raw, assembled.rows, assembled.longest)

    def warm_up(self, model: LoadedModel, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Arrays:
        """A single request's outputs, computed in the calling thread (load time)."""
        assembled = assemble(model.spec, [dict(inputs)])
        return split(model.spec, assembled, self.forward(model, assembled))[0]

    def compute(self, batch: Batch, parts: Sequence[Arrays], assembled: Assembled) -> BatchRun:
        """Forward on an assembled batch (compute thread). If it raises, the
        batch is bisected request by request so only the requests that fail
        alone get a ModelFailure."""
        started_ms = time.time() * 1000
        t0 = time.perf_counter()
        try:
            outputs: Arrays | None = self.forward(batch.model, assembled)
            failed = None
        except Exception as exc:
            requests = [m.inputs for item in batch.items for m in item.members()]
            outputs, failed = None, self._bisect(batch.model, requests, exc)
        infer_ms = (time.perf_counter() - t0) * 1000
        return BatchRun(assembled, outputs, failed, started_ms, infer_ms)

    def _each(self, model: LoadedModel, requests: Sequence[Arrays]) -> list[Arrays | ModelFailure]:
        """Outputs per request, assembled and split in the calling thread."""
        assembled = assemble(model.spec, requests)  # plain memory: staging is the event loop's
        try:
            outputs = self.forward(model, assembled)
        except Exception as exc:
            return self._bisect(model, requests, exc)
        return list(split(model.spec, assembled, outputs))

    def _bisect(
        self, model: LoadedModel, requests: Sequence[Arrays], exc: Exception
    ) -> list[Arrays | ModelFailure]:
        if len(requests) == 1:
            return [ModelFailure(f"{type(exc).__name__}: {exc}")]
        half = len(requests) // 2
        return self._each(model, requests[:half]) + self._each(model, requests[half:])


def _to_torch(array: np.ndarray[Any, Any], dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":  # uint16 bits -> the same bits as bfloat16
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    if not array.flags.writeable:  # torch warns on read-only buffers; batches are copies
        array = array.copy()
    return torch.from_numpy(array)


def _outputs_to_numpy(spec: ModelSpec, raw: Any, rows: int, longest: int) -> Arrays:
    """The outputs by declared name as wire-storage arrays, each checked for
    the batch's ``rows`` and its declared axes (on the tensor's shape, before
    any copy to the host)."""
    names = [t.name for t in spec.outputs]
    if isinstance(raw, torch.Tensor):
        values = {names[0]: raw} if len(names) == 1 else {}
    elif isinstance(raw, tuple | list):
        values = dict(zip(names, raw, strict=False)) if len(raw) == len(names) else {}
    elif isinstance(raw, dict):
        values = {n: raw[n] for n in names if n in raw}
    else:
        values = {}
    if len(values) != len(names):
        raise ConfigError(
            f"model {spec.name!r} returned {type(raw).__name__}; expected outputs {names} "
            "(one tensor, a tuple in declared order, or a dict by name)"
        )
    arrays: Arrays = {}
    for tensor in spec.outputs:
        value = values[tensor.name]
        if not isinstance(value, torch.Tensor):
            raise ConfigError(
                f"model {spec.name!r} output {tensor.name!r}: {type(value).__name__}, not a tensor"
            )
        check_output(spec.name, tensor, value.shape, rows, longest)
        # Each torch call drops the GIL and waits to retake it from the busy
        # event loop: only the calls that change something are made.
        if value.requires_grad:
            value = value.detach()
        want = _TORCH_DTYPES[tensor.dtype]
        if value.dtype != want:
            value = value.to(want)
        if value.device.type != "cpu":
            value = value.cpu()
        if tensor.dtype == "bfloat16":
            arrays[tensor.name] = value.view(torch.int16).numpy().view(WIRE_DTYPES["bfloat16"])
        else:
            arrays[tensor.name] = value.numpy()
    return arrays


class Answering:
    """Packing a computed batch's answers, parcel by parcel."""

    def __init__(self, spec: ModelSpec, run: BatchRun, rows: int, worker: str) -> None:
        self._dtypes = {t.name: t.dtype for t in spec.outputs}
        self._run = run
        self._rows = rows
        self._worker = worker

    def _timings(self, item: Accepted) -> Timings:
        """The same for every member of a parcel (they share its entry's wait)."""
        queued_ms = max(0.0, self._run.started_ms - item.enqueued_ms)
        return Timings(queued_ms, self._run.infer_ms, self._rows, self._worker)

    def ok(self, item: Accepted, outputs: Arrays) -> Outcome:
        """A parcel computed without failure: its members' rows of ``outputs``."""
        offsets = item.offsets
        timings = self._timings(item)

        def singles() -> list[bytes]:
            return pack_ok_results(item.ids, offsets, outputs, self._dtypes, timings)

        inbox = item.reply_to[0]
        if item.count == 1 or inbox is None or any(r != inbox for r in item.reply_to):
            payloads = singles()
            pushes = tuple((r, p) for r, p in zip(item.reply_to, payloads, strict=True) if r)
            return Outcome(item.stream.queue, item.entry_id, item.ids, item.store, pushes,
                           fixed(payloads))  # fmt: skip
        rows = [offsets[i + 1] - offsets[i] for i in range(item.count)]
        element = pack_result_bundle(item.ids, rows, outputs, self._dtypes, timings)
        return Outcome(item.stream.queue, item.entry_id, item.ids, item.store,
                       ((inbox, element),), singles)  # fmt: skip

    def each(self, item: Accepted, answers: Sequence[Arrays | ModelFailure]) -> Outcome:
        """A parcel of a bisected batch: each member's own outputs or failure."""
        payloads = []
        timings = self._timings(item)
        for request_id, outputs in zip(item.ids, answers, strict=True):
            if isinstance(outputs, ModelFailure):
                result = Result.failure(request_id, "error", "model_error", str(outputs))
            else:
                result = Result(request_id, "ok", outputs=outputs)
            result.queued_ms, result.infer_ms, result.batch_size, result.worker = timings
            payloads.append(pack_result(result, self._dtypes))
        pushes = tuple((r, p) for r, p in zip(item.reply_to, payloads, strict=True) if r)
        return Outcome(item.stream.queue, item.entry_id, item.ids, item.store, pushes,
                       fixed(payloads))  # fmt: skip
