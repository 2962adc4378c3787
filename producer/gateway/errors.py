"""Every failure leaves the gateway as a JSON body ``{"error": "..."}`` (as
the Open Inference Protocol specifies), never a traceback.

tensorq's typed errors carry their HTTP status (common/errors.py); the few
refusals that exist only over HTTP are ``HTTPProblem``; aiohttp's own (no
route, wrong method, body too large) keep their status and get a JSON body.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from common.errors import InferenceError, QueueFull, TensorQError

log = logging.getLogger(__name__)

CANCELLED_STATUS = 410  # the request was cancelled: its result will never exist


class HTTPProblem(Exception):
    """A refusal of the HTTP layer: unknown request id, a reused id, no live
    worker for a sync request, ..."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    body = json.dumps({"error": message})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)


def status_of(exc: TensorQError) -> int:
    if isinstance(exc, InferenceError) and exc.code == "cancelled":
        return CANCELLED_STATUS
    return exc.http_status


def error_middleware(retry_after_s: int) -> Middleware:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except TensorQError as exc:
            headers = {"Retry-After": str(retry_after_s)} if isinstance(exc, QueueFull) else None
            return error_response(status_of(exc), str(exc), headers)
        except HTTPProblem as exc:
            return error_response(exc.status, exc.message, exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")}
            return error_response(exc.status, _reason(exc), headers)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error_response(500, "internal error (see the gateway log)")

    return errors


def _reason(exc: web.HTTPException) -> str:
    text = exc.text or ""
    if text and not text.startswith("{") and text != f"{exc.status}: {exc.reason}":
        return text
    return exc.reason
