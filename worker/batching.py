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

    @property
    def longest(self) -> int:
        """The longest request on the reference variable axis (0: none)."""
        return max(self.lengths, default=0)


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


class OutputMismatch(Exception):
    """A forward's output breaks its declared shape: a model error, bisected
    like an exception the model raised."""


def check_output(
    model: str, tensor: TensorSpec, shape: Sequence[int], rows: int, longest: int
) -> None:
    """Raise OutputMismatch unless an output of ``shape`` fits ``tensor`` for
    a batch of ``rows`` rows: exactly those rows first, then each declared
    fixed axis at its size and each variable axis at least ``longest`` (the
    longest request on the reference axis), so ``split`` can cut it back to
    every request's length."""
    got = tuple(shape)
    if got == (rows, *tensor.shape):  # the common case: nothing variable
        return
    if (
        len(got) == len(tensor.shape) + 1
        and got[0] == rows
        and all(
            a >= longest if d == VARIABLE else a == d
            for a, d in zip(got[1:], tensor.shape, strict=True)
        )
    ):
        return
    declared = ", ".join(map(str, tensor.shape))
    variable = f", each -1 at least {longest} (the longest request)" if tensor.variable_axes else ""
    raise OutputMismatch(
        f"model {model!r} output {tensor.name!r}: got shape {list(got)}, declared "
        f"[n, {declared}] with n = {rows} (the batch's rows){variable}"
    )


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
