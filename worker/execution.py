"""Batch execution on one device: assemble inputs (into pinned host memory
on CUDA), run ``forward`` under ``torch.inference_mode()``, map the outputs to
the declared names, and split them back per request. When a batch raises,
it is bisected so only the culprit requests get an error.

Runs in the worker's single compute thread, off the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from common.codec import WIRE_DTYPES
from common.envelope import Arrays
from common.errors import ConfigError
from common.spec import ModelSpec
from worker.batching import Allocator, assemble, split
from worker.registry import LoadedModel

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


class ModelFailure(Exception):
    """forward raised for one request even when run alone."""


class DeviceExecutor:
    """Runs batches for one device. Not thread-safe: one compute thread owns it."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        # One growing pinned staging buffer per input position, reused across
        # batches; safe because each batch ends with a device->host copy
        # (a sync) before the next is assembled in this same thread.
        self._staging: dict[int, torch.Tensor] = {}
        self._next_slot = 0

    def allocator(self) -> Allocator | None:
        if not self.cuda:
            return None
        self._next_slot = 0

        def allocate(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
            slot = self._next_slot
            self._next_slot += 1
            nbytes = int(np.prod(shape)) * dtype.itemsize
            buf = self._staging.get(slot)
            if buf is None or buf.numel() < nbytes:
                buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
                self._staging[slot] = buf
            return buf[:nbytes].numpy().view(dtype).reshape(shape)

        return allocate

    def forward(self, model: LoadedModel, inputs: Sequence[np.ndarray[Any, Any]]) -> Arrays:
        """One forward call on already-assembled arrays (declared input order)."""
        tensors = [
            _to_torch(a, t.dtype).to(self.device, non_blocking=self.cuda)
            for a, t in zip(inputs, model.spec.inputs, strict=True)
        ]
        with torch.inference_mode():
            raw = model.module(*tensors)
        return _outputs_to_numpy(model.spec, raw)

    def run_one(self, model: LoadedModel, inputs: Mapping[str, np.ndarray[Any, Any]]) -> Arrays:
        """A single request's outputs (used for warm-up)."""
        assembled = assemble(model.spec, [dict(inputs)])
        return split(model.spec, assembled, self.forward(model, assembled.inputs))[0]

    def run_batch(
        self, model: LoadedModel, requests: Sequence[Arrays]
    ) -> list[Arrays | ModelFailure]:
        """Outputs per request; a request whose forward raises alone gets a ModelFailure."""
        allocate = self.allocator()
        assembled = (
            assemble(model.spec, requests, allocate) if allocate else assemble(model.spec, requests)
        )
        try:
            outputs = self.forward(model, assembled.inputs)
        except Exception as exc:
            if len(requests) == 1:
                return [ModelFailure(f"{type(exc).__name__}: {exc}")]
            half = len(requests) // 2
            return self.run_batch(model, requests[:half]) + self.run_batch(model, requests[half:])
        return list(split(model.spec, assembled, outputs))


def _to_torch(array: np.ndarray[Any, Any], dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":  # uint16 bits -> the same bits as bfloat16
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    if not array.flags.writeable:  # torch warns on read-only buffers; batches are copies
        array = array.copy()
    return torch.from_numpy(array)


def _outputs_to_numpy(spec: ModelSpec, raw: Any) -> Arrays:
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
        value = values[tensor.name].detach()
        want = _TORCH_DTYPES[tensor.dtype]
        if value.dtype != want:
            value = value.to(want)
        value = value.cpu()
        if tensor.dtype == "bfloat16":
            arrays[tensor.name] = value.view(torch.int16).numpy().view(WIRE_DTYPES["bfloat16"])
        else:
            arrays[tensor.name] = value.numpy()
    return arrays
