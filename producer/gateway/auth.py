"""Optional bearer-token auth: with ``[gateway] tokens`` set, every endpoint
but ``/v2/health/*`` (probes) and the sign-in page needs
``Authorization: Bearer <token>`` naming one of them, compared in constant
time; otherwise 401.

A browser cannot send that header to the status page, so it signs in once:
``GET /`` answers 401 with a sign-in form (``POST /login``), and
``GET /?token=<token>`` signs in directly (for a bookmark; the token then
sits in the browser's history and proxy logs, so the form is better). Either
sets an HttpOnly, SameSite=Strict cookie holding an HMAC of the token (never
the token itself) and redirects to ``/``. The cookie stands for its token on
GET and HEAD requests only (the page, ``/v1/status``, ``/metrics``): nothing
that enqueues or cancels, so no other site can make a signed-in browser do
either. Removing a token from the configuration ends its cookies too.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from producer.gateway.errors import error_response

EXEMPT_PREFIX = "/v2/health/"
LOGIN_PATH = "/login"
PAGE_PATH = "/"
COOKIE = "tensorq_session"
SAFE_METHODS = frozenset({"GET", "HEAD"})
_CHALLENGE = 'Bearer realm="tensorq"'
_COOKIE_CONTEXT = b"tensorq status page session v1"


def session_value(token: str) -> str:
    """The cookie value that stands for ``token`` (an HMAC: it does not reveal it)."""
    return hmac.new(token.encode(), _COOKIE_CONTEXT, hashlib.sha256).hexdigest()


class Tokens:
    """The configured tokens, and the session cookies derived from them."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self._secrets = [t.encode() for t in tokens]
        self._sessions = [session_value(t).encode() for t in tokens]

    def token_ok(self, given: str) -> bool:
        return _matches(given.strip().encode(), self._secrets)

    def session_ok(self, given: str) -> bool:
        return _matches(given.encode(), self._sessions)


def auth_middleware(tokens: Sequence[str]) -> Middleware:
    known = Tokens(tokens)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(EXEMPT_PREFIX) or request.path == LOGIN_PATH:
            return await handler(request)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and given:
            if known.token_ok(given):
                return await handler(request)
            return error_response(
                401,
                "invalid bearer token",
                {"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'},
            )
        if request.method in SAFE_METHODS:
            if known.session_ok(request.cookies.get(COOKIE, "")):
                return await handler(request)
            if request.path == PAGE_PATH:  # a browser: sign in, by the link or the form
                query_token = request.query.get("token")
                if query_token is not None and known.token_ok(query_token):
                    return signed_in(request, query_token)
                return login_page(request, failed=query_token is not None)
        return error_response(401, "missing bearer token", {"WWW-Authenticate": _CHALLENGE})

    return auth


def signed_in(request: web.Request, token: str) -> web.Response:
    """303 to the status page, with the session cookie of ``token``."""
    response = web.Response(status=303, headers={"Location": PAGE_PATH})
    response.set_cookie(
        COOKIE,
        session_value(token),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    return response


def login_page(request: web.Request, *, failed: bool, status: int = 401) -> web.Response:
    """The sign-in form (401: the status page needs a token)."""
    message = '<p class="no">That token is not valid.</p>' if failed else ""
    return web.Response(
        status=status,
        text=LOGIN_PAGE.replace("{message}", message),
        content_type="text/html",
        headers={"WWW-Authenticate": _CHALLENGE, "Cache-Control": "no-store"},
    )


async def login(request: web.Request) -> web.StreamResponse:
    """``POST /login`` (form field ``token``): the session cookie and 303 to
    the page, or the form again (401). ``GET /login``: the form."""
    known: Tokens | None = request.app.get(TOKENS)
    if request.method != "POST":
        if known is None:  # no auth configured: nothing to sign in to
            return web.Response(status=303, headers={"Location": PAGE_PATH})
        return login_page(request, failed=False, status=200)
    form = await request.post()
    token = form.get("token")
    if known is None or not isinstance(token, str) or not known.token_ok(token):
        return login_page(request, failed=True)
    return signed_in(request, token)


TOKENS = web.AppKey("tokens", Tokens)


def _matches(given: bytes, secrets: Sequence[bytes]) -> bool:
    """Compare against every secret (no early exit), each in constant time."""
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(given, secret)
    return found


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tensorq: sign in</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 24px; color: #222; }
 h1 { font-size: 20px; } .no { color: #b00; } input { font: inherit; padding: 4px; }
</style></head>
<body>
<h1>tensorq</h1>
<p>This gateway needs a token (one of <code>[gateway] tokens</code>).</p>
{message}
<form method="post" action="/login">
<label>Token <input type="password" name="token" autocomplete="current-password"
 autofocus required></label>
<button type="submit">Sign in</button>
</form>
</body></html>
"""
