"""Typed errors: one class per outcome a caller handles differently.

Each class names the HTTP status the gateway maps it to, and carries the
request id when one is known. Library errors are wrapped where they enter
(``raise X(...) from None``) so callers never catch redis or msgpack types.
"""

from __future__ import annotations


class TensorQError(Exception):
    """Base class. ``code`` is the machine-readable error code of a result."""

    code = "internal"
    http_status = 500

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        if self.request_id:
            return f"{self.message} (request {self.request_id})"
        return self.message


class ProtocolError(TensorQError):
    """A payload that is not a valid tensorq message (HTTP 400)."""

    code = "protocol_error"
    http_status = 400


class InvalidInput(ProtocolError):
    """Well-formed tensors that do not fit the model's declared inputs (HTTP 400)."""

    code = "invalid_input"


class UnknownModel(TensorQError):
    """No worker has published this model (HTTP 404)."""

    code = "unknown_model"
    http_status = 404


class QueueFull(TensorQError):
    """The model's queue is at its ``max_queue_len`` (HTTP 429, Retry-After)."""

    code = "queue_full"
    http_status = 429

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message, request_id=request_id)
        self.refused: list[str] = [request_id] if request_id else []


class DuplicateRequest(TensorQError):
    """A request id that is still in flight in this client (or, at the
    gateway, already in use) was submitted again (HTTP 409). Nothing was
    enqueued; reusing an id after its result arrived is allowed."""

    code = "duplicate_request"
    http_status = 409


class UnknownRequest(TensorQError):
    """wait/result of an id nobody submitted, whose result has expired, or
    that is not a valid request id (HTTP 404); raised at once, not after
    the timeout."""

    code = "unknown_request"
    http_status = 404


class RequestTimeout(TensorQError):
    """No result within the caller's timeout, or the request expired (HTTP 504)."""

    code = "timeout"
    http_status = 504


class InferenceError(TensorQError):
    """The worker answered with an error result (HTTP 500).

    ``code`` is the worker's error code (``invalid_input``, ``model_error``,
    ``cancelled`` ...), so one except clause serves every worker-side failure.
    """

    http_status = 500

    def __init__(self, message: str, *, code: str, request_id: str | None = None) -> None:
        super().__init__(message, request_id=request_id)
        self.code = code


class ConfigError(TensorQError):
    """A configuration file, variable or flag that cannot be used."""

    code = "config_error"


class RedisUnavailable(TensorQError):
    """Redis cannot be reached or refuses our credentials (HTTP 503).

    The message names the URL with its password masked.
    """

    code = "redis_unavailable"
    http_status = 503


class MissingExtra(TensorQError):
    """A verb needs a package of an optional extra that is not installed
    (``pip install 'tensorq[gateway]'``); raised before the verb starts any work."""

    code = "missing_extra"
