"""Request and result envelopes: versioned msgpack maps (see docs/protocol.md).

``pack_*`` never validate (the caller built the values); ``unpack_*`` always
do, and turn any malformed payload into ``ProtocolError`` carrying the
request id whenever one could be read, so a worker can answer it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import msgpack
import numpy as np

from common.codec import DEFAULT_LIMITS, CodecLimits, decode_tensor, encode_tensor, wire_dtype_of
from common.errors import ProtocolError

PROTOCOL_VERSION = 1  # what pack_* write
KNOWN_VERSIONS = (1,)  # what unpack_* read

Status = Literal["ok", "error", "expired", "cancelled"]
STATUSES: tuple[str, ...] = ("ok", "error", "expired", "cancelled")

Arrays = dict[str, np.ndarray[Any, Any]]


@dataclass(slots=True)
class Request:
    id: str
    model: str
    inputs: Arrays
    deadline_ms: int | None = None
    reply_to: str | None = None
    priority: int = 0
    store: bool = True  # keep the result under tq:r:<id> (pollable by id)


@dataclass(slots=True)
class Result:
    id: str
    status: Status
    outputs: Arrays = field(default_factory=dict)
    error_code: str = ""
    error_message: str = ""
    queued_ms: float = 0.0
    infer_ms: float = 0.0
    batch_size: int = 0
    worker: str = ""

    @classmethod
    def failure(
        cls, request_id: str, status: Status, code: str, message: str, *, worker: str = ""
    ) -> Result:
        return cls(request_id, status, error_code=code, error_message=message, worker=worker)


class Timings(NamedTuple):
    """Where a batch's time went, the same for every result it answers."""

    queued_ms: float = 0.0
    infer_ms: float = 0.0
    batch_size: int = 0
    worker: str = ""

    @classmethod
    def of(cls, result: Result) -> Timings:
        return cls(result.queued_ms, result.infer_ms, result.batch_size, result.worker)

    def fields(self) -> dict[str, Any]:
        """The result map's timing fields."""
        return {
            "queued_ms": round(self.queued_ms, 3),
            "infer_ms": round(self.infer_ms, 3),
            "batch_size": self.batch_size,
            "worker": self.worker,
        }

    @classmethod
    def read(cls, body: Mapping[Any, Any], what: str, request_id: str | None = None) -> Timings:
        """The timing fields of a result map (or result bundle) ``what``."""
        try:
            return cls(
                float(body.get("queued_ms", 0.0)),
                float(body.get("infer_ms", 0.0)),
                int(body.get("batch_size", 0)),
                str(body.get("worker", "")),
            )
        except (TypeError, ValueError, OverflowError):
            raise ProtocolError(
                f"{what}: 'queued_ms', 'infer_ms' and 'batch_size' must be numbers",
                request_id=request_id,
            ) from None


def pack_request(request: Request) -> bytes:
    body: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "id": request.id,
        "model": request.model,
        "inputs": {k: encode_tensor(v) for k, v in request.inputs.items()},
    }
    if request.deadline_ms is not None:
        body["deadline"] = request.deadline_ms
    if request.reply_to:
        body["reply_to"] = request.reply_to
    if request.priority:
        body["priority"] = request.priority
    if not request.store:
        body["store"] = False
    return msgpack.packb(body, use_bin_type=True)


def unpack_request(payload: bytes, limits: CodecLimits = DEFAULT_LIMITS) -> Request:
    return request_of(unpack_map(payload, limits, "request"), limits)


def request_of(body: Mapping[Any, Any], limits: CodecLimits = DEFAULT_LIMITS) -> Request:
    """A single request from its already-unpacked map."""
    request_id = body.get("id")
    if not isinstance(request_id, str) or not request_id:
        raise ProtocolError(f"request: 'id' must be a non-empty string, got {request_id!r:.40}")
    try:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ProtocolError("request: 'model' must be a non-empty string")
        fields = decode_request_fields(body, limits)
    except ProtocolError as exc:
        raise ProtocolError(exc.message, request_id=request_id) from None
    return Request(request_id, model, *fields)


def check_version(body: Mapping[Any, Any], what: str) -> None:
    """Refuse a message of a protocol version this code does not know (its
    fields may mean something else); a message without ``v`` is read as 1."""
    version = body.get("v", PROTOCOL_VERSION)
    if type(version) is not int or version not in KNOWN_VERSIONS:
        known = ", ".join(map(str, KNOWN_VERSIONS))
        raise ProtocolError(
            f"{what}: protocol version {version!r:.20} is not one this tensorq reads ({known})"
        )


class RequestFields(NamedTuple):
    inputs: Arrays
    deadline_ms: int | None
    reply_to: str | None
    priority: int
    store: bool


def decode_request_fields(body: Mapping[Any, Any], limits: CodecLimits) -> RequestFields:
    """Validate and decode a request map's version, inputs, deadline,
    reply_to and priority (shared by the stream decoder and the gateway's
    msgpack bodies)."""
    check_version(body, "request")
    raw_inputs = body.get("inputs")
    if not isinstance(raw_inputs, Mapping) or not raw_inputs:
        raise ProtocolError("request: 'inputs' must be a non-empty map of name -> tensor")
    inputs = {}
    for name, tensor in raw_inputs.items():
        if not isinstance(name, str):
            raise ProtocolError("request: input names must be strings")
        inputs[name] = decode_tensor(tensor, limits, name=f"input {name!r}")
    deadline = body.get("deadline")
    if deadline is not None and type(deadline) is not int:
        raise ProtocolError("request: 'deadline' must be an int (unix ms)")
    reply_to = body.get("reply_to")
    if reply_to is not None and not isinstance(reply_to, str):
        raise ProtocolError("request: 'reply_to' must be a string")
    priority = body.get("priority", 0)
    if type(priority) is not int:
        raise ProtocolError("request: 'priority' must be an int")
    store = body.get("store", True)
    if type(store) is not bool:
        raise ProtocolError("request: 'store' must be true or false")
    return RequestFields(inputs, deadline, reply_to, priority, store)


def pack_result(result: Result, output_dtypes: Mapping[str, str] | None = None) -> bytes:
    """``output_dtypes`` names wire dtypes the arrays cannot carry (bfloat16)."""
    dtypes = output_dtypes or {}
    body: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "id": result.id,
        "status": result.status,
        **Timings.of(result).fields(),
    }
    if result.status == "ok":
        body["outputs"] = {k: encode_tensor(v, dtypes.get(k)) for k, v in result.outputs.items()}
    else:
        body["error"] = {"code": result.error_code, "message": result.error_message}
    return msgpack.packb(body, use_bin_type=True)


def pack_ok_results(
    ids: Sequence[str],
    offsets: Sequence[int],
    outputs: Arrays,
    output_dtypes: Mapping[str, str],
    timings: Timings,
) -> list[bytes]:
    """``pack_result`` of the ``ok`` results of requests computed together
    (request i owns rows offsets[i]:offsets[i+1] of every output), built
    from pieces packed once: the same map ``pack_result`` writes (its keys
    in another order), at a fraction of the cost per request."""
    packb = msgpack.packb
    common = {"v": PROTOCOL_VERSION, "status": "ok", **timings.fields()}
    head = bytes([0x80 | (len(common) + 2)]) + b"".join(
        packb(k) + packb(v) for k, v in common.items()
    ) + packb("id")  # fmt: skip
    outputs_head = packb("outputs") + _map_header(len(outputs))
    columns = []  # per output: its key and per-row prefix, bytes, bytes per row
    for name, array in outputs.items():
        dtype = output_dtypes.get(name) or wire_dtype_of(array)
        prefix = packb(name) + b"\x83" + packb("dtype") + packb(dtype) + packb("shape")
        whole = np.ascontiguousarray(array)
        data = memoryview(whole).cast("B") if whole.size else memoryview(b"")  # type: ignore[arg-type]
        row_bytes = data.nbytes // whole.shape[0] if whole.shape[0] else 0
        columns.append((prefix, whole.shape[1:], data, row_bytes))
    data_key = packb("data")
    shapes: dict[tuple[int, tuple[int, ...]], bytes] = {}  # packed shapes, by rows
    payloads = []
    for i, request_id in enumerate(ids):
        start, end = offsets[i], offsets[i + 1]
        parts = [head, packb(request_id), outputs_head]
        for prefix, rest, data, row_bytes in columns:
            shape = shapes.get((end - start, rest))
            if shape is None:
                shape = shapes.setdefault((end - start, rest), packb([end - start, *rest]))
            chunk = data[start * row_bytes : end * row_bytes]
            parts += [prefix, shape, data_key, _bin_header(chunk.nbytes), bytes(chunk)]
        payloads.append(b"".join(parts))
    return payloads


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _map_header(n: int) -> bytes:
    return bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big")


def unpack_result(
    payload: bytes, limits: CodecLimits = DEFAULT_LIMITS, *, body: Mapping[Any, Any] | None = None
) -> Result:
    """One result map (``body``: the same, already unpacked)."""
    if body is None:
        body = unpack_map(payload, limits, "result")
    request_id = body.get("id")
    status = body.get("status")
    if not isinstance(request_id, str) or status not in STATUSES:
        raise ProtocolError("result: needs a string 'id' and a known 'status'")
    try:
        check_version(body, "result")
    except ProtocolError as exc:
        raise ProtocolError(exc.message, request_id=request_id) from None
    result = Result(request_id, status)
    result.queued_ms, result.infer_ms, result.batch_size, result.worker = Timings.read(
        body, "result", request_id
    )
    if status == "ok":
        outputs = body.get("outputs")
        if not isinstance(outputs, Mapping):
            raise ProtocolError("result: 'outputs' must be a map", request_id=request_id)
        try:
            result.outputs = {
                str(k): decode_tensor(v, limits, name=f"output {k!r}") for k, v in outputs.items()
            }
        except ProtocolError as exc:
            raise ProtocolError(exc.message, request_id=request_id) from None
    else:
        error = body.get("error")
        if isinstance(error, Mapping):
            result.error_code = str(error.get("code", ""))
            result.error_message = str(error.get("message", ""))
    return result


def peek_id_and_reply_to(payload: bytes) -> tuple[str | None, str | None]:
    """The ``id`` and ``reply_to`` of a request that may not validate, when
    they can be read, so even a rejected request gets an answer."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception:
        return None, None
    if not isinstance(body, dict):
        return None, None
    request_id, reply_to = body.get("id"), body.get("reply_to")
    return (
        request_id if isinstance(request_id, str) and request_id else None,
        reply_to if isinstance(reply_to, str) else None,
    )


def unpack_map(payload: bytes, limits: CodecLimits, what: str) -> dict[Any, Any]:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ProtocolError(f"{what}: expected msgpack bytes, got {type(payload).__name__}")
    if len(payload) > limits.max_payload_bytes + 65536:
        raise ProtocolError(
            f"{what}: {len(payload)} bytes exceeds the limit of {limits.max_payload_bytes}"
        )
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"{what}: not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{what}: expected a msgpack map, got {type(body).__name__}")
    return body
