"""Optional bearer-token auth: with ``[gateway] tokens`` set, every endpoint
but ``/v2/health/*`` (probes) needs ``Authorization: Bearer <token>`` naming
one of them, compared in constant time; otherwise 401."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from producer.gateway.errors import error_response

EXEMPT_PREFIX = "/v2/health/"
_CHALLENGE = 'Bearer realm="tensorq"'


def auth_middleware(tokens: Sequence[str]) -> Middleware:
    secrets = [t.encode() for t in tokens]

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(EXEMPT_PREFIX):
            return await handler(request)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return error_response(401, "missing bearer token", {"WWW-Authenticate": _CHALLENGE})
        if not _matches(given.strip().encode(), secrets):
            return error_response(
                401,
                "invalid bearer token",
                {"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'},
            )
        return await handler(request)

    return auth


def _matches(given: bytes, secrets: Sequence[bytes]) -> bool:
    """Compare against every token (no early exit), each in constant time."""
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(given, secret)
    return found
