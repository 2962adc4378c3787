"""Model signatures: the declared inputs/outputs of a model and the checks
that a request's tensors fit them.

The same ``ModelSpec`` is read from config by workers, published to
``tq:models`` as JSON, and read back by clients and the gateway, so a request
is checked by one function at submit time and again by the worker.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

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
        if rows < 1:
            raise InvalidInput("a request needs at least one row", request_id=request_id)
        if rows > self.max_batch_size:
            raise InvalidInput(
                f"{rows} rows exceed model {self.name!r} max_batch_size {self.max_batch_size}",
                request_id=request_id,
            )
        return rows


def _fits(actual: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    if actual == declared:  # the common case: no variable axis
        return True
    return all((d == VARIABLE and a >= 1) or a == d for a, d in zip(actual, declared, strict=True))


def _dtype_name(array: np.ndarray[Any, Any]) -> str:
    for name, dt in WIRE_DTYPES.items():
        if array.dtype == dt:
            return name
    return str(array.dtype)
