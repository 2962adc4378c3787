"""Open Inference Protocol (KServe v2) bodies <-> numpy: the JSON tensor
format and the binary tensor data extension.

Pure functions, no I/O. Arrays come out in tensorq's wire storage (BF16 as
uint16 bits, see common/codec.py); anything malformed is a ``ProtocolError``
naming what is wrong (400). JSON goes through orjson: parsing the numbers of
a tensor is most of a request's cost, and orjson does it ~9x faster than the
standard library.

JSON numbers must fit their datatype: a value beyond the FP16/BF16/FP32
range (``1e39`` for FP32) is refused rather than turned into infinity, and
``true``/``false`` are values of BOOL tensors only. Non-finite floats are
written as Triton writes them (and reads them): ``NaN``, ``Infinity`` and
``-Infinity``, JSON's common extension (Python's ``json``, Triton's clients
and rapidjson read them; strict parsers such as ``JSON.parse`` do not: ask
for binary outputs to get exact bits). In output, floats are otherwise
written in their shortest round-trip form for their dtype.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from common.codec import WIRE_DTYPES, CodecLimits, bf16_bits_to_float32
from common.errors import InvalidInput, ProtocolError
from common.ids import REQUEST_ID_RULE, is_request_id
from common.spec import ModelSpec

HEADER_LENGTH = "Inference-Header-Content-Length"

OIP_TO_WIRE: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "BF16": "bfloat16",
    "FP32": "float32",
    "FP64": "float64",
}
WIRE_TO_OIP: dict[str, str] = {wire: oip for oip, wire in OIP_TO_WIRE.items()}
_INTEGER = frozenset({"uint8", "int8", "int16", "int32", "int64"})  # bfloat16 is stored as uint16

# Request ids become Redis key suffixes and /v1/requests/{id} path segments.


@dataclass(frozen=True)
class OutputRequest:
    """The outputs a client asked for (None: all, in declared order) and
    which of them come back as binary data."""

    names: tuple[str, ...] | None = None
    binary: Mapping[str, bool] = field(default_factory=dict)  # per-output "binary_data"
    binary_default: bool = False  # request-level "binary_data_output"

    def wants_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)

    def to_json(self) -> dict[str, Any]:
        return {"names": self.names, "binary": dict(self.binary), "default": self.binary_default}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> OutputRequest:
        names = raw.get("names")
        return cls(
            names=tuple(names) if names is not None else None,
            binary=dict(raw.get("binary") or {}),
            binary_default=bool(raw.get("default")),
        )


@dataclass
class InferRequest:
    """A parsed OIP inference request: wire-storage arrays by input name."""

    id: str | None
    inputs: dict[str, np.ndarray[Any, Any]]
    outputs: OutputRequest


def check_request_id(value: object) -> str | None:
    """An OIP ``id`` as a tensorq request id; "" or absent means: generate one."""
    if value is None or value == "":
        return None
    if not is_request_id(value):
        raise ProtocolError(f"'id' must be {REQUEST_ID_RULE}, got {value!r:.60}")
    return value


def parse_infer_request(
    body: bytes, header_length: str | None, limits: CodecLimits
) -> InferRequest:
    """Parse a JSON body, or with ``Inference-Header-Content-Length`` a JSON
    header followed by the binary tensor data of the inputs that say so."""
    binary = memoryview(b"")
    header = body
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 <= length <= len(body):
            raise ProtocolError(
                f"{HEADER_LENGTH} {header_length!r:.30} is not a length within the "
                f"{len(body)}-byte body"
            )
        header, binary = body[:length], memoryview(body)[length:]
    doc = _load_json(header)
    # true/false inside numbers would quietly become 1/0: look for them only
    # when the header has the words at all (the usual body has neither)
    may_hold_bools = b"true" in header or b"false" in header
    if not isinstance(doc, dict):
        raise ProtocolError(f"the inference request must be a JSON object, got {_kind(doc)}")
    request_id = check_request_id(doc.get("id"))
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("'inputs' must be a non-empty list of tensors")
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    offset = 0
    for raw in raw_inputs:
        name, array, used = _parse_input(raw, binary, offset, limits, may_hold_bools)
        if name in inputs:
            raise ProtocolError(f"input {name!r} is given twice")
        inputs[name] = array
        offset += used
    if offset != len(binary):
        raise ProtocolError(
            f"the body holds {len(binary)} bytes of binary tensor data, "
            f"the inputs' binary_data_size add up to {offset}"
        )
    parameters = _parameters(doc, "the request")
    default = parameters.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise ProtocolError("parameter 'binary_data_output' must be a boolean")
    return InferRequest(request_id, inputs, _parse_outputs(doc.get("outputs"), default))


def check_outputs(spec: ModelSpec, wanted: OutputRequest) -> None:
    """Refuse requested outputs the model does not have (before anything is enqueued)."""
    if wanted.names is None:
        return
    declared = [t.name for t in spec.outputs]
    unknown = [n for n in wanted.names if n not in declared]
    if unknown:
        raise InvalidInput(f"model {spec.name!r} has no output(s) {unknown}; it has {declared}")


def encode_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: Mapping[str, np.ndarray[Any, Any]],
    wanted: OutputRequest,
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length
    (the value of ``Inference-Header-Content-Length``)."""
    names = wanted.names if wanted.names is not None else tuple(outputs)
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name in names:
        array = outputs[name]
        datatype = datatype_of(array)
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if wanted.wants_binary(name):
            data = np.ascontiguousarray(array).tobytes()
            tensor["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            tensor["data"] = json_data(array)
        tensors.append(tensor)
    doc: dict[str, Any] = {"model_name": model_name}
    if model_version:
        doc["model_version"] = model_version
    doc["id"] = request_id
    doc["outputs"] = tensors
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def datatype_of(array: np.ndarray[Any, Any]) -> str:
    """OIP datatype of a wire-storage array (uint16 is BF16 bits inside tensorq)."""
    if array.dtype == np.uint16:
        return "BF16"
    for wire, storage in WIRE_DTYPES.items():
        if array.dtype == storage:
            return WIRE_TO_OIP[wire]
    raise ProtocolError(f"dtype {array.dtype} has no OIP datatype")


def json_values(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Flattened row-major values for the JSON tensor format (orjson writes
    numpy arrays itself, with OPT_SERIALIZE_NUMPY)."""
    if array.dtype == np.uint16:  # BF16 bits: widen losslessly
        array = bf16_bits_to_float32(array)
    return np.ascontiguousarray(array).reshape(-1)


def json_data(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | orjson.Fragment:
    """An output's JSON ``data``: the flat values, for orjson to write; with
    NaN or infinities (which orjson writes as null), the list written here
    with ``NaN``/``Infinity``/``-Infinity`` in their places, as Triton does."""
    values = json_values(array)
    if values.dtype.kind != "f" or bool(np.isfinite(values).all()):
        return values
    text = orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY)
    parts = text.split(b"null")  # each null is a non-finite value, in order
    specials = values[~np.isfinite(values)]
    words = [b"NaN" if np.isnan(v) else b"Infinity" if v > 0 else b"-Infinity" for v in specials]
    pieces = [parts[0]]
    for word, part in zip(words, parts[1:], strict=True):
        pieces += [word, part]
    return orjson.Fragment(b"".join(pieces))


def float_to_bf16_bits(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """float -> bfloat16 bits, rounding to nearest even as torch does."""
    as_f32 = np.ascontiguousarray(values, dtype=np.float32)
    bits = as_f32.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(as_f32)
    if nan.any():  # keep NaN a NaN (rounding could carry it into infinity)
        rounded[nan] = ((bits[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


# -- internals ----------------------------------------------------------------


def _parse_input(
    raw: object, binary: memoryview, offset: int, limits: CodecLimits, may_hold_bools: bool
) -> tuple[str, np.ndarray[Any, Any], int]:
    """One ``$request_input``: its name, wire-storage array and binary bytes used."""
    if not isinstance(raw, dict):
        raise ProtocolError(f"each input must be a JSON object, got {_kind(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError("each input needs a non-empty string 'name'")
    where = f"input {name!r}"
    datatype = raw.get("datatype")
    wire = OIP_TO_WIRE.get(datatype) if isinstance(datatype, str) else None
    if wire is None:
        raise ProtocolError(
            f"{where}: datatype {datatype!r:.30} is not supported (one of {', '.join(OIP_TO_WIRE)})"
        )
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ProtocolError(f"{where}: 'shape' must be a list of ints >= 0, got {shape!r:.60}")
    if len(shape) > limits.max_dims:
        raise ProtocolError(f"{where}: {len(shape)} dims, at most {limits.max_dims} allowed")
    storage = WIRE_DTYPES[wire]
    count = math.prod(shape)
    nbytes = count * storage.itemsize
    if nbytes > limits.max_payload_bytes:
        raise ProtocolError(
            f"{where}: {nbytes} bytes exceeds the limit of {limits.max_payload_bytes}"
        )
    size = _parameters(raw, where).get("binary_data_size")
    if size is None:
        if "data" not in raw:
            raise ProtocolError(f"{where}: needs 'data' or a binary_data_size parameter")
        return name, _from_json(raw["data"], wire, shape, where, may_hold_bools), 0
    if type(size) is not int or size < 0:
        raise ProtocolError(f"{where}: binary_data_size must be an int >= 0")
    if "data" in raw:
        raise ProtocolError(f"{where}: has both 'data' and binary_data_size")
    if size != nbytes:
        raise ProtocolError(
            f"{where}: shape {shape} of {datatype} needs {nbytes} bytes, binary_data_size is {size}"
        )
    if offset + size > len(binary):
        raise ProtocolError(
            f"{where}: binary data ends at byte {len(binary)}, the tensor needs up to "
            f"{offset + size}"
        )
    try:
        array = np.frombuffer(binary, dtype=storage, count=count, offset=offset).reshape(shape)
    except (ValueError, OverflowError):  # zero-size shape with a dim numpy cannot hold
        raise ProtocolError(f"{where}: shape {shape} is too large") from None
    if wire == "bool" and count and int(array.view(np.uint8).max()) > 1:
        raise ProtocolError(f"{where}: BOOL binary data must be bytes 0 or 1")
    return name, array, size


def _from_json(
    data: object, wire: str, shape: Sequence[int], where: str, may_hold_bools: bool = True
) -> np.ndarray[Any, Any]:
    """A JSON ``data`` list (flat or nested, row-major) as a wire-storage array."""
    if not isinstance(data, list):
        raise ProtocolError(f"{where}: 'data' must be a list, got {_kind(data)}")
    count = math.prod(shape)
    try:
        values = np.asarray(data)
    except (ValueError, TypeError):  # ragged nesting
        raise ProtocolError(f"{where}: 'data' is not a regular (row-major) array") from None
    if values.size != count:
        raise ProtocolError(
            f"{where}: shape {list(shape)} needs {count} values, 'data' has {values.size}"
        )
    kind = values.dtype.kind
    storage = WIRE_DTYPES[wire]
    if count == 0:
        try:
            return np.zeros(shape, dtype=storage)
        except (ValueError, OverflowError):  # a dim numpy cannot hold
            raise ProtocolError(f"{where}: shape {list(shape)} is too large") from None
    if wire == "bool":
        if kind != "b":
            raise ProtocolError(f"{where}: BOOL data must be true/false values")
    elif wire in _INTEGER:
        if kind not in "iu":
            raise ProtocolError(f"{where}: {WIRE_TO_OIP[wire]} data must be integers")
        info = np.iinfo(storage)
        if int(values.min()) < info.min or int(values.max()) > info.max:
            raise ProtocolError(
                f"{where}: values outside the {WIRE_TO_OIP[wire]} range {info.min}..{info.max}"
            )
    elif kind not in "iuf":
        raise ProtocolError(f"{where}: {WIRE_TO_OIP[wire]} data must be numbers")
    if wire != "bool" and may_hold_bools and _holds_bool(data):
        raise ProtocolError(
            f"{where}: {WIRE_TO_OIP[wire]} data must be numbers; true/false are BOOL values"
        )
    if wire == "bfloat16":
        bits = float_to_bf16_bits(values)
        _check_range(values, bf16_bits_to_float32(bits), wire, where)
        return bits.reshape(shape)
    with np.errstate(over="ignore"):  # checked below: a cast would quietly give inf
        array = values.astype(storage)
    if wire in _LARGEST:
        _check_range(values, array, wire, where)
    return array.reshape(shape)


def _check_range(
    values: np.ndarray[Any, Any], cast: np.ndarray[Any, Any], wire: str, where: str
) -> None:
    """Refuse finite values the cast made infinite (beyond the datatype's range)."""
    if bool(np.isfinite(cast).all()):
        return
    overflowed = np.isinf(cast) & np.isfinite(values)
    if overflowed.any():
        first = values[overflowed].flat[0]
        raise ProtocolError(
            f"{where}: value {first:g} is beyond the {WIRE_TO_OIP[wire]} range "
            f"(largest finite {_LARGEST[wire]:g})"
        )


_LARGEST = {  # the largest finite value of each narrow float datatype
    "float16": float(np.finfo(np.float16).max),
    "float32": float(np.finfo(np.float32).max),
    "bfloat16": float(bf16_bits_to_float32(np.array([0x7F7F], np.uint16))[0]),
}


def _holds_bool(data: list[Any]) -> bool:
    """Whether a (nested) JSON list holds true or false (type checks run in C)."""
    if data and isinstance(data[0], list):
        return any(_holds_bool(row) for row in data if isinstance(row, list))
    return bool in set(map(type, data))


def _parse_outputs(raw: object, binary_default: bool) -> OutputRequest:
    if raw is None:
        return OutputRequest(binary_default=binary_default)
    if not isinstance(raw, list):
        raise ProtocolError(f"'outputs' must be a list, got {_kind(raw)}")
    names: list[str] = []
    binary: dict[str, bool] = {}
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ProtocolError("each requested output must be an object with a string 'name'")
        name = item["name"]
        if name in names:
            raise ProtocolError(f"output {name!r} is requested twice")
        names.append(name)
        flag = _parameters(item, f"output {name!r}").get("binary_data")
        if flag is not None:
            if not isinstance(flag, bool):
                raise ProtocolError(f"output {name!r}: binary_data must be a boolean")
            binary[name] = flag
    return OutputRequest(tuple(names) if names else None, binary, binary_default)


def _parameters(obj: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    parameters = obj.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise ProtocolError(f"{where}: 'parameters' must be an object")
    return parameters


_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _load_json(text: bytes) -> Any:
    """orjson; a body with ``NaN``/``Infinity`` (which Triton reads and writes,
    and orjson refuses) is read again by the standard library, with only
    those words allowed beyond strict JSON."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:  # also invalid UTF-8 and too deep nesting
        reason: Exception = exc
        if b"NaN" in text or b"Infinity" in text:
            try:
                return json.loads(text, parse_constant=_NON_FINITE.__getitem__,
                                  parse_float=_finite_float)  # fmt: skip
            except (ValueError, RecursionError) as second:  # its reason is the real one
                reason = second
        raise ProtocolError(f"malformed JSON: {reason}") from None


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: beyond every float datatype
        raise ValueError(f"number {text} is out of range")
    return value


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__
