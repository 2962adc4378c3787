"""The request id rule, one function for the client and the gateway alike.

A request id becomes a Redis key suffix (``tq:r:<id>``, on Cluster inside
a hash tag ``{<id>}``) and a URL path segment (``GET /v1/requests/<id>``),
so it is 1 to 128 characters from ``A-Z a-z 0-9 . _ : -``: no braces (they
would break the hash tag), no ``/`` or ``?``, no spaces, newlines or other
control characters. A UUID (hex, or with dashes) fits. docs/protocol.md
states the same rule for producers in other languages.
"""

from __future__ import annotations

import re
from typing import TypeGuard

from common.errors import InvalidInput

MAX_REQUEST_ID_LEN = 128
REQUEST_ID_RULE = f"1 to {MAX_REQUEST_ID_LEN} characters from A-Z a-z 0-9 . _ : -"
_REQUEST_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID_LEN}}}")

# A client's id names its inbox and prefixes the ids it generates
# (``<client_id>-<counter>``, the counter at most 20 digits): same characters, shorter.
MAX_CLIENT_ID_LEN = MAX_REQUEST_ID_LEN - 21
CLIENT_ID_RULE = f"1 to {MAX_CLIENT_ID_LEN} characters from A-Z a-z 0-9 . _ : -"


def is_request_id(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and _REQUEST_ID.fullmatch(value) is not None


def check_request_id(value: object) -> str:
    """``value`` if it is a valid request id, else ``InvalidInput`` saying the rule."""
    if not is_request_id(value):
        raise InvalidInput(f"request id must be {REQUEST_ID_RULE}, got {value!r:.60}")
    return value


def is_client_id(value: object) -> bool:
    return is_request_id(value) and len(value) <= MAX_CLIENT_ID_LEN
