"""The msgpack wire format on the v1 API, and content negotiation.

A v1 body with ``Content-Type: application/msgpack`` is a request map as in
docs/protocol.md (``inputs`` of wire tensors; optional ``id``, ``deadline``,
``priority``; ``model`` if given must match the path; ``reply_to`` is the
gateway's own). With ``Accept: application/msgpack`` answers are msgpack
maps, and a finished ``ok`` result is the stored result envelope byte for
byte. Errors are JSON whatever the Accept header says.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from aiohttp import web

from common.codec import CodecLimits
from common.envelope import decode_request_fields
from common.errors import ProtocolError
from producer.gateway.oip import check_request_id

MSGPACK = "application/msgpack"
_MSGPACK_TYPES = (MSGPACK, "application/x-msgpack")


@dataclass
class WireRequest:
    id: str | None
    inputs: dict[str, np.ndarray[Any, Any]]
    timeout_s: float | None  # from ``deadline``
    priority: int


def is_msgpack_body(request: web.Request) -> bool:
    return request.content_type in _MSGPACK_TYPES


def wants_msgpack(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return any(kind in accept for kind in _MSGPACK_TYPES)


def respond(request: web.Request, doc: Mapping[str, Any], *, status: int = 200,
            headers: Mapping[str, str] | None = None) -> web.Response:  # fmt: skip
    """``doc`` as msgpack or JSON, as the client's Accept header asks."""
    if wants_msgpack(request):
        body = msgpack.packb(dict(doc), use_bin_type=True)
        return web.Response(body=body, status=status, content_type=MSGPACK, headers=headers)
    return web.json_response(dict(doc), status=status, headers=headers)


def parse_wire_request(body: bytes, model: str, limits: CodecLimits) -> WireRequest:
    try:
        doc = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"malformed msgpack ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"the request must be a msgpack map, got {type(doc).__name__}")
    named = doc.get("model")
    if named is not None and named != model:
        raise ProtocolError(f"the body names model {named!r:.60}, the path {model!r}")
    request_id = check_request_id(doc.get("id"))
    fields = decode_request_fields(doc, limits)  # the same checks as the stream decoder
    deadline = fields.deadline_ms
    timeout = None if deadline is None else deadline / 1000 - time.time()
    return WireRequest(request_id, fields.inputs, timeout, fields.priority)
