"""The wire tensor codec: numpy arrays <-> msgpack maps ``{dtype, shape, data}``.

``data`` is the C-contiguous little-endian buffer. Decoding is zero-copy
(``np.frombuffer`` over the received bytes, so decoded arrays are read-only)
and validating: every malformed tensor raises ``ProtocolError`` naming what is
wrong. numpy has no bfloat16, so a bfloat16 tensor travels inside tensorq as a
``uint16`` array of its raw bits (uint16 is not a wire dtype, so the meaning is
unambiguous); ``bf16_bits_to_float32`` widens it for users.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import ProtocolError

# wire name -> numpy storage dtype (little-endian). bfloat16 is stored as raw bits.
WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float64": np.dtype("<f8"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}

# Inside tensorq a uint16 array is always bfloat16 bits; users never send uint16
# (``as_wire_array`` refuses it), so this reverse map is unambiguous.
_NUMPY_TO_WIRE: dict[np.dtype[Any], str] = {
    dt.newbyteorder("="): name for name, dt in WIRE_DTYPES.items()
}


# Storage dtypes a user's array may already have (uint16 is bfloat16 bits inside only).
_STORAGE = frozenset(dt for name, dt in WIRE_DTYPES.items() if name != "bfloat16")


@dataclass(frozen=True)
class CodecLimits:
    """Bounds a decoder enforces before it trusts a payload."""

    max_payload_bytes: int = 64 * 1024 * 1024
    max_dims: int = 8


DEFAULT_LIMITS = CodecLimits()


def wire_dtype_of(array: np.ndarray[Any, Any]) -> str:
    """The wire dtype name of a numpy array; ProtocolError if it has none."""
    name = _NUMPY_TO_WIRE.get(array.dtype.newbyteorder("="))
    if name is None:
        raise ProtocolError(
            f"dtype {array.dtype} is not a wire dtype (one of {', '.join(WIRE_DTYPES)})"
        )
    return name


def as_wire_array(value: object, *, name: str = "tensor") -> np.ndarray[Any, Any]:
    """Turn a user's numpy array or torch tensor into a wire-storage array.

    torch tensors are moved to the CPU; bfloat16 becomes its uint16 bits.
    A numpy uint16 array is refused: uint16 is not a wire dtype. A big-endian
    array (``>f4``, as some file formats and network code hand out) is
    converted to the wire's little-endian byte order: a copy, the same values.
    """
    if type(value) is np.ndarray and value.dtype in _STORAGE:  # the common case
        return value
    if type(value).__module__.startswith("torch"):
        tensor: Any = value
        tensor = tensor.detach().cpu().contiguous()
        if str(tensor.dtype) == "torch.bfloat16":
            import torch  # already imported by whoever built the tensor

            return np.asarray(tensor.view(torch.int16).numpy().view(np.uint16))
        value = tensor.numpy()
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    native = array.dtype.newbyteorder("=")
    if native == np.uint16 or native not in _NUMPY_TO_WIRE:
        raise ProtocolError(
            f"{name}: dtype {array.dtype} is not a wire dtype (one of {', '.join(WIRE_DTYPES)})"
        )
    storage = WIRE_DTYPES[_NUMPY_TO_WIRE[native]]
    if array.dtype != storage:  # the same type in the other byte order
        return array.astype(storage)
    return array


def encode_tensor(array: np.ndarray[Any, Any], dtype: str | None = None) -> dict[str, Any]:
    """Build the wire map for ``array``. ``dtype`` overrides the inferred name
    (needed for bfloat16, whose bits arrive as uint16)."""
    name = dtype or wire_dtype_of(array)
    storage = WIRE_DTYPES[name]
    contiguous = np.asarray(array, dtype=storage, order="C")  # keeps 0-d arrays 0-d
    # memoryview avoids the copy tobytes() would make; msgpack packs it as bin.
    data = memoryview(contiguous).cast("B") if contiguous.size else b""  # type: ignore[arg-type]
    return {"dtype": name, "shape": list(contiguous.shape), "data": data}


def decode_tensor(
    obj: object, limits: CodecLimits = DEFAULT_LIMITS, *, name: str = "tensor"
) -> np.ndarray[Any, Any]:
    """Validate a wire map and view its buffer as a read-only numpy array."""
    if not isinstance(obj, Mapping):
        raise ProtocolError(f"{name}: expected a map with dtype/shape/data, got {_kind(obj)}")
    dtype_name = obj.get("dtype")
    shape = obj.get("shape")
    data = obj.get("data")
    if not isinstance(dtype_name, str):
        raise ProtocolError(f"{name}: 'dtype' must be a string, got {_kind(dtype_name)}")
    storage = WIRE_DTYPES.get(dtype_name)
    if storage is None:
        raise ProtocolError(
            f"{name}: unknown dtype {dtype_name!r} (one of {', '.join(WIRE_DTYPES)})"
        )
    if not isinstance(shape, list | tuple):
        raise ProtocolError(f"{name}: 'shape' must be a list of ints, got {_kind(shape)}")
    if len(shape) > limits.max_dims:
        raise ProtocolError(f"{name}: {len(shape)} dims, at most {limits.max_dims} allowed")
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise ProtocolError(f"{name}: shape {list(shape)!r} must hold ints >= 0")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"{name}: 'data' must be binary, got {_kind(data)}")
    expected = math.prod(shape) * storage.itemsize
    if expected > limits.max_payload_bytes:
        raise ProtocolError(
            f"{name}: {expected} bytes exceeds the limit of {limits.max_payload_bytes}"
        )
    if len(data) != expected:
        raise ProtocolError(
            f"{name}: shape {list(shape)} of {dtype_name} needs {expected} bytes, got {len(data)}"
        )
    try:
        return np.frombuffer(data, dtype=storage).reshape(shape)
    except (ValueError, OverflowError):  # zero-size shape with a dim numpy cannot hold
        raise ProtocolError(f"{name}: shape {list(shape)} is too large") from None


def bf16_bits_to_float32(bits: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Widen bfloat16 raw bits (uint16) to float32, losslessly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _kind(value: object) -> str:
    return type(value).__name__
