"""Async submission and result polling by id.

``POST /v1/models/{model}/requests`` enqueues (OIP JSON, binary extension or
msgpack wire body) and answers 202 with the id and a Location header;
``GET /v1/requests/{id}`` answers 200 with the result, 202 while pending and
404 when unknown or expired, long-polling up to ``?wait=S`` seconds;
``DELETE /v1/requests/{id}`` cancels a request that has not started.
"""

from __future__ import annotations

import math

from aiohttp import web

from common.envelope import unpack_result
from common.errors import ProtocolError
from common.records import AcceptedMarker
from producer.gateway import oip, wire
from producer.gateway.errors import HTTPProblem
from producer.gateway.routes_v2 import oip_response, ok_outputs
from producer.gateway.state import GATEWAY


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/models/{model}/requests", submit)
    router.add_get("/v1/requests/{id}", get_result)
    router.add_delete("/v1/requests/{id}", cancel)


async def submit(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    spec = await gw.spec(request.match_info["model"])
    body = await request.read()
    timeout: float | None = None
    priority = 0
    wanted = oip.OutputRequest()
    if wire.is_msgpack_body(request):
        parsed_wire = wire.parse_wire_request(body, spec.name, gw.limits)
        request_id, inputs = parsed_wire.id, parsed_wire.inputs
        timeout, priority = parsed_wire.timeout_s, parsed_wire.priority
    else:
        parsed = oip.parse_infer_request(body, request.headers.get(oip.HEADER_LENGTH), gw.limits)
        oip.check_outputs(spec, parsed.outputs)
        request_id, inputs, wanted = parsed.id, parsed.inputs, parsed.outputs
    spec.check_inputs(inputs, request_id=request_id)  # a 400 writes nothing, not even a marker
    request_id = await gw.accept(
        spec, inputs, request_id=request_id, timeout=timeout, priority=priority, wanted=wanted
    )
    gw.followers.follow(request_id)
    location = f"/v1/requests/{request_id}"
    doc = {"id": request_id, "model": spec.name, "status": "pending"}
    return wire.respond(request, doc, status=202, headers={"Location": location})


async def get_result(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    request_id = request.match_info["id"]
    wait = _wait_seconds(request.query.get("wait"), gw.settings.gateway.max_wait_s)
    raw, marker = await gw.fetch(request_id)
    if raw is None and marker is not None and wait > 0:
        await gw.watcher.wait(request_id, wait)
        raw, marker = await gw.fetch(request_id)
    if raw is not None:
        return _finished(request, request_id, raw, marker or AcceptedMarker(""))
    if marker is None:
        raise HTTPProblem(404, f"no request {request_id!r}: unknown, or its result expired")
    return wire.respond(request, {"id": request_id, "status": "pending"}, status=202)


async def cancel(request: web.Request) -> web.Response:
    """202 once asked; a request a worker already started still completes."""
    gw = request.app[GATEWAY]
    request_id = request.match_info["id"]
    raw, marker = await gw.fetch(request_id)
    if raw is not None:
        raise HTTPProblem(409, f"request {request_id!r} has already finished")
    if marker is None:
        raise HTTPProblem(404, f"no request {request_id!r}: unknown, or its result expired")
    await gw.cancel(request_id)
    return wire.respond(request, {"id": request_id, "status": "cancelling"}, status=202)


def _finished(
    request: web.Request, request_id: str, raw: bytes, marker: AcceptedMarker
) -> web.Response:
    gw = request.app[GATEWAY]
    result = unpack_result(raw, gw.limits)
    outputs = ok_outputs(result)  # a failed request answers its error (500, 504, 410)
    if wire.wants_msgpack(request):
        return web.Response(body=raw, content_type=wire.MSGPACK)  # the stored envelope as is
    wanted = oip.OutputRequest.from_json(marker.outputs)
    return oip_response(marker.model, "", request_id, outputs, wanted)


def _wait_seconds(value: str | None, cap: float) -> float:
    if value is None:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise ProtocolError(f"'wait' must be a number of seconds >= 0, got {value!r:.30}")
    return min(seconds, cap)
