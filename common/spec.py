"""Model signatures: the declared inputs/outputs of a model and the checks
that a request's tensors fit them.

The same ``ModelSpec`` is read from config by workers, published to
``tq:models`` as JSON, and read back by clients and the gateway, so a request
is checked by one function at submit time and again by the worker.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np

from common.codec import WIRE_DTYPES
from common.errors import ConfigError, InvalidInput, ProtocolError

VARIABLE = -1


@dataclass(frozen=True)
class TensorSpec:
    """One input or output, its shape given without the leading batch axis."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pad_value: float = 0

    def __post_init__(self) -> None:
        if self.dtype not in WIRE_DTYPES:
            raise ConfigError(f"tensor {self.name!r}: unknown dtype {self.dtype!r}")
        if any(d != VARIABLE and d < 1 for d in self.shape):
            raise ConfigError(f"tensor {self.name!r}: shape {self.shape} needs dims >= 1 or -1")
        if not isinstance(self.pad_value, int | float):
            raise ConfigError(f"tensor {self.name!r}: pad_value {self.pad_value!r} is not a number")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TensorSpec:
        return cls(
            name=str(raw["name"]),
            dtype=str(raw["dtype"]),
            shape=tuple(int(d) for d in raw["shape"]),
            pad_value=raw.get("pad_value", 0),
        )

    @property
    def variable_axes(self) -> tuple[int, ...]:
        """Axes (of the per-row shape) that vary between requests."""
        return tuple(i for i, d in enumerate(self.shape) if d == VARIABLE)


@dataclass(frozen=True)
class ModelSpec:
    """What a worker serves under one model name."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 64
    version: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError(f"model {self.name!r} declares no inputs")
        if not self.outputs:
            raise ConfigError(f"model {self.name!r} declares no outputs")
        if self.max_batch_size < 1:
            raise ConfigError(f"model {self.name!r}: max_batch_size must be >= 1")

    @property
    def max_batch_bytes(self) -> int | None:
        """The most bytes one forward's padded inputs may take (``[[models]]
        max_batch_bytes``, published in ``extra``); None when unknown."""
        limit = self.extra.get("max_batch_bytes")
        return limit if isinstance(limit, int) and not isinstance(limit, bool) else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelSpec:
        raw = json.loads(text)
        return cls(
            name=raw["name"],
            inputs=tuple(TensorSpec.from_dict(t) for t in raw["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in raw["outputs"]),
            max_batch_size=int(raw["max_batch_size"]),
            version=str(raw.get("version", "")),
            extra=dict(raw.get("extra", {})),
        )

    def check_inputs(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], *, request_id: str | None = None
    ) -> int:
        """Raise InvalidInput unless ``inputs`` fit this model; return the row count.

        ``inputs`` hold wire-storage arrays (bfloat16 as uint16 bits), so the
        dtype check compares storage dtypes.
        """
        rows = self._check_arrays(inputs, request_id)
        if rows < 1:
            raise InvalidInput("a request needs at least one row", request_id=request_id)
        self._check_size(rows, lambda: padded_bytes(self, [inputs]), request_id)
        return rows

    def check_bundle(
        self,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        offsets: Sequence[int],
        *,
        request_id: str | None = None,
    ) -> None:
        """Raise InvalidInput unless the stacked ``inputs`` of a bundle's
        members (member i owns rows offsets[i]:offsets[i+1]) fit this model,
        each member as ``check_inputs`` would judge it alone."""
        total = self._check_arrays(inputs, request_id)
        if total != offsets[-1]:
            raise InvalidInput(
                f"bundle inputs hold {total} rows, its members {offsets[-1]}", request_id=request_id
            )
        most = max(b - a for a, b in itertools.pairwise(offsets))
        # stacked members share their per-row shape: the largest is the biggest
        self._check_size(most, lambda: padded_bytes(self, [inputs]) // total * most, request_id)

    def _check_size(self, rows: int, nbytes: Callable[[], int], request_id: str | None) -> None:
        """One request's rows against max_batch_size, its bytes against max_batch_bytes."""
        if rows > self.max_batch_size:
            raise InvalidInput(
                f"{rows} rows exceed model {self.name!r} max_batch_size {self.max_batch_size}",
                request_id=request_id,
            )
        limit = self.max_batch_bytes
        if limit is not None:
            size = nbytes()
            if size > limit:
                raise InvalidInput(
                    f"inputs take {size} bytes, over model {self.name!r} max_batch_bytes {limit} "
                    "(the most one forward's inputs may take): send fewer rows or shorter inputs",
                    request_id=request_id,
                )

    def _check_arrays(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], request_id: str | None
    ) -> int:
        """Names, dtypes and per-row shapes; the rows all inputs agree on."""
        if not isinstance(inputs, Mapping):
            raise ProtocolError("inputs must be a map of name -> tensor", request_id=request_id)
        declared = {s.name for s in self.inputs}
        unknown = set(inputs) - declared
        if unknown:
            raise InvalidInput(
                f"model {self.name!r} has no input(s) {sorted(unknown)}; "
                f"expected {sorted(declared)}",
                request_id=request_id,
            )
        rows = -1
        for spec in self.inputs:
            if spec.name not in inputs:
                raise InvalidInput(
                    f"model {self.name!r}: missing input {spec.name!r}", request_id=request_id
                )
            array = inputs[spec.name]
            if array.dtype != WIRE_DTYPES[spec.dtype]:
                raise InvalidInput(
                    f"input {spec.name!r}: dtype {_dtype_name(array)}, model wants {spec.dtype}",
                    request_id=request_id,
                )
            if array.ndim != len(spec.shape) + 1 or not _fits(array.shape[1:], spec.shape):
                raise InvalidInput(
                    f"input {spec.name!r}: shape {list(array.shape)}, model wants "
                    f"[n, {', '.join(map(str, spec.shape))}] (-1 = any length)",
                    request_id=request_id,
                )
            n = array.shape[0]
            if rows < 0:
                rows = n
            elif n != rows:
                raise InvalidInput(
                    f"inputs disagree on the batch axis: {spec.name!r} has {n} rows, others {rows}",
                    request_id=request_id,
                )
        return rows


class PaddedSize(NamedTuple):
    """The padded size in bytes of one forward's inputs, grown request by
    request: per input, rows x the product of the per-row shape padded to the
    longest in the batch on each variable axis x the itemsize, summed over
    inputs. The one place this is computed (client, reader and scheduler);
    a tuple, so that the scheduler's per-request step stays cheap."""

    spec: ModelSpec
    rows: int = 0
    shapes: tuple[tuple[int, ...], ...] = ()  # per input: its padded per-row shape so far
    nbytes: int = 0

    def join(self, inputs: Mapping[str, np.ndarray[Any, Any]]) -> PaddedSize:
        """The size once a request with ``inputs`` (already checked) joins."""
        tensors = self.spec.inputs
        rows = self.rows + inputs[tensors[0].name].shape[0]
        shapes = []
        row_bytes = 0
        for i, tensor in enumerate(tensors):
            array = inputs[tensor.name]
            shape = array.shape[1:]
            if self.shapes and VARIABLE in tensor.shape:
                shape = tuple(map(max, shape, self.shapes[i]))
            shapes.append(shape)
            row_bytes += math.prod(shape) * array.itemsize  # checked: the declared dtype
        return PaddedSize(self.spec, rows, tuple(shapes), rows * row_bytes)


def padded_bytes(spec: ModelSpec, requests: Iterable[Mapping[str, np.ndarray[Any, Any]]]) -> int:
    """The padded size in bytes of one forward's inputs for ``requests`` batched
    together (one request alone: the size of its inputs)."""
    size = PaddedSize(spec)
    for inputs in requests:
        size = size.join(inputs)
    return size.nbytes


def check_output_axes(
    model: str, inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec]
) -> None:
    """A variable output axis is cut back to each request's length on the
    first variable input axis: refuse one on a model with no variable input."""
    if any(t.variable_axes for t in inputs):
        return
    for tensor in outputs:
        if tensor.variable_axes:
            raise ConfigError(
                f"model {model!r}: output {tensor.name!r} declares a variable axis "
                f"(shape {list(tensor.shape)}) but no input has one, so there is no request "
                "length to cut it back to: declare its fixed size instead of -1"
            )


def _fits(actual: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    if actual == declared:  # the common case: no variable axis
        return True
    return all((d == VARIABLE and a >= 1) or a == d for a, d in zip(actual, declared, strict=True))


def _dtype_name(array: np.ndarray[Any, Any]) -> str:
    for name, dt in WIRE_DTYPES.items():
        if array.dtype == dt:
            return name
    return str(array.dtype)
