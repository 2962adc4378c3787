"""Batch assembly: requests -> one array per input along the batch axis,
padded on declared variable axes; and the reverse, model outputs -> one
slice per request, variable axes cut back to each request's length.

Pure numpy, so it is tested without torch or Redis. ``allocate`` lets the
executor assemble straight into pinned host memory on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.codec import WIRE_DTYPES
from common.envelope import Arrays
from common.spec import VARIABLE, ModelSpec, TensorSpec

Allocator = Callable[[tuple[int, ...], np.dtype[Any]], np.ndarray[Any, Any]]


def _numpy_empty(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    return np.empty(shape, dtype=dtype)


@dataclass(frozen=True)
class Assembled:
    """A batch's model inputs and where each request's rows sit in it."""

    inputs: tuple[np.ndarray[Any, Any], ...]  # in declared input order
    offsets: tuple[int, ...]  # request i owns rows offsets[i]:offsets[i+1]
    lengths: tuple[int, ...]  # each request's length on the reference variable axis

    @property
    def rows(self) -> int:
        return self.offsets[-1]


def assemble(
    spec: ModelSpec, requests: Sequence[Arrays], allocate: Allocator = _numpy_empty
) -> Assembled:
    """Concatenate already-validated requests (``ModelSpec.check_inputs``)."""
    offsets = [0]
    for inputs in requests:
        offsets.append(offsets[-1] + inputs[spec.inputs[0].name].shape[0])
    total = offsets[-1]
    arrays = []
    for tensor in spec.inputs:
        parts = [inputs[tensor.name] for inputs in requests]
        dtype = WIRE_DTYPES[tensor.dtype]
        if not tensor.variable_axes:
            out = allocate((total, *tensor.shape), dtype)
            np.concatenate(parts, axis=0, out=out)
        else:
            longest = tuple(max(p.shape[1 + i] for p in parts) for i in range(len(tensor.shape)))
            out = allocate((total, *longest), dtype)
            out[...] = _pad_fill(tensor)
            for part, start in zip(parts, offsets, strict=False):
                out[(slice(start, start + part.shape[0]), *map(slice, part.shape[1:]))] = part
        arrays.append(out)
    return Assembled(tuple(arrays), tuple(offsets), _reference_lengths(spec, requests))


def split(spec: ModelSpec, assembled: Assembled, outputs: Arrays) -> list[Arrays]:
    """One output map per request: row slices, variable axes cut to its length."""
    results: list[Arrays] = []
    for i in range(len(assembled.offsets) - 1):
        start, end = assembled.offsets[i], assembled.offsets[i + 1]
        per_request: Arrays = {}
        for tensor in spec.outputs:
            rows = outputs[tensor.name][start:end]
            if tensor.variable_axes:
                length = assembled.lengths[i]
                cut = tuple(
                    slice(0, length) if d == VARIABLE else slice(None) for d in tensor.shape
                )
                rows = rows[(slice(None), *cut)]
            per_request[tensor.name] = rows
        results.append(per_request)
    return results


def _reference_lengths(spec: ModelSpec, requests: Sequence[Arrays]) -> tuple[int, ...]:
    # A variable output axis follows the first variable axis of the first
    # input that has one (documented in README: one sequence length per model).
    for tensor in spec.inputs:
        if tensor.variable_axes:
            axis = 1 + tensor.variable_axes[0]
            return tuple(inputs[tensor.name].shape[axis] for inputs in requests)
    return tuple(0 for _ in requests)


def _pad_fill(tensor: TensorSpec) -> Any:
    if tensor.dtype == "bfloat16":  # stored as bits: take the top half of the float32
        return np.array(tensor.pad_value, dtype=np.float32).view(np.uint32) >> 16
    return tensor.pad_value
