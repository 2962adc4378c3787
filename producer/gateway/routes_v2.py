"""Open Inference Protocol (KServe v2 / Triton HTTP) endpoints: health,
server and model metadata, model readiness, and synchronous inference
(JSON tensors or the binary tensor data extension), with the versioned
``/v2/models/{model}/versions/{version}/...`` forms of each model route."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from aiohttp import web

from common.envelope import Arrays, Result
from common.spec import ModelSpec, TensorSpec
from producer.client import outputs_of
from producer.gateway import oip
from producer.gateway.errors import HTTPProblem
from producer.gateway.live import LIVE
from producer.gateway.state import GATEWAY

PLATFORM = "pytorch_libtorch"  # what Triton calls a TorchScript model
NOT_READY = 503  # what load balancers take for "send nothing here"
EXTENSIONS = ["binary_tensor_data"]


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v2/health/live", live)
    router.add_get("/v2/health/ready", ready)
    router.add_get("/v2", server_metadata)
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        router.add_get(base, model_metadata)
        router.add_get(f"{base}/ready", model_ready)
        router.add_post(f"{base}/infer", infer)


async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    """Ready = Redis reachable and at least one live worker; else 503, as
    load balancers expect (from the gateway's view of the workers: no Redis
    round trip unless it says "not ready")."""
    problem = await request.app[LIVE].confirmed_problem()
    if problem:
        return _not_ready({}, problem)
    return web.json_response({"ready": True})


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response({"name": "tensorq", "version": _version(), "extensions": EXTENSIONS})


async def model_metadata(request: web.Request) -> web.Response:
    spec = await _spec(request)
    return web.json_response(
        {
            "name": spec.name,
            "versions": [spec.version] if spec.version else [],
            "platform": PLATFORM,
            "inputs": [_tensor_metadata(t) for t in spec.inputs],
            "outputs": [_tensor_metadata(t) for t in spec.outputs],
        }
    )


async def model_ready(request: web.Request) -> web.Response:
    """200 if a live worker serves the model; 503 if none does; 404 if unknown."""
    spec = await _spec(request)
    doc = {"name": spec.name}
    problem = await request.app[LIVE].confirmed_problem(spec.name)
    if problem:
        return _not_ready(doc, problem)
    return web.json_response({**doc, "ready": True})


async def infer(request: web.Request) -> web.Response:
    """Enqueue, wait up to ``sync_timeout_s`` for the result, answer it. When
    no live worker serves the model nothing would answer: 503 at once."""
    gw = request.app[GATEWAY]
    spec = await _spec(request)
    body = await request.read()
    parsed = oip.parse_infer_request(body, request.headers.get(oip.HEADER_LENGTH), gw.limits)
    oip.check_outputs(spec, parsed.outputs)
    unserved = await request.app[LIVE].unserved(spec.name)
    if unserved:
        retry = {"Retry-After": str(gw.settings.gateway.retry_after_s)}
        raise HTTPProblem(503, f"{unserved}: nothing would answer this request", retry)
    timeout = gw.settings.gateway.sync_timeout_s
    given = parsed.id
    if given is not None:  # two requests in flight under one id would get one answer
        if given in gw.sync_ids:
            raise HTTPProblem(409, f"request id {given!r} is already in flight")
        gw.sync_ids.add(given)
    try:
        request_id = await gw.submit(
            spec, parsed.inputs, request_id=given, timeout=timeout, store=False
        )
        result = await gw.client.wait(request_id, timeout)
    finally:
        if given is not None:
            gw.sync_ids.discard(given)
    return oip_response(spec.name, spec.version, request_id, ok_outputs(result), parsed.outputs)


def ok_outputs(result: Result) -> Arrays:
    """The wire-storage outputs of an ``ok`` result; the typed error of any other."""
    if result.status != "ok":
        outputs_of(result)  # raises InferenceError / RequestTimeout
    return result.outputs


def oip_response(
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: Arrays,
    wanted: oip.OutputRequest,
) -> web.Response:
    body, header_length = oip.encode_response(
        model_name=model_name,
        model_version=model_version,
        request_id=request_id,
        outputs=outputs,
        wanted=wanted,
    )
    if header_length is None:
        return web.Response(body=body, content_type="application/json")
    return web.Response(
        body=body,
        content_type="application/octet-stream",
        headers={oip.HEADER_LENGTH: str(header_length)},
    )


async def _spec(request: web.Request) -> ModelSpec:
    return await request.app[GATEWAY].spec(
        request.match_info["model"], request.match_info.get("version")
    )


def _tensor_metadata(tensor: TensorSpec) -> dict[str, Any]:
    return {
        "name": tensor.name,
        "datatype": oip.WIRE_TO_OIP[tensor.dtype],
        "shape": [-1, *tensor.shape],  # the batch axis first; -1 = any length
    }


def _not_ready(doc: dict[str, Any], reason: str) -> web.Response:
    return web.json_response({**doc, "ready": False, "error": reason}, status=NOT_READY)


def _version() -> str:
    try:
        return version("tensorq")
    except PackageNotFoundError:
        return "0+unknown"
