"""What a request is made of before it is enqueued: ``Submission`` (one
request for ``submit_many``), and the checks and packing that turn it into a
``Prepared`` stream payload (inputs as wire arrays, the timeout as a
deadline, the msgpack request). Whatever is wrong with one submission fails
it alone, before it joins other submitters' round trip."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.codec import as_wire_array
from common.envelope import Request, pack_request
from common.errors import InvalidInput
from common.ids import check_request_id
from common.spec import ModelSpec

# Longest timeout a request may carry: its deadline must stay a sane int64 of ms.
MAX_TIMEOUT_S = 10 * 365 * 24 * 3600.0

# A model's queue limit when its published metadata names none.
DEFAULT_MAX_QUEUE_LEN = 100_000


@dataclass(frozen=True)
class Submission:
    """One request for ``submit_many``. ``InvalidInput`` at once for inputs
    that are no mapping or a ``request_id`` outside the id rule (common/ids.py)."""

    model: str
    inputs: Mapping[str, Any]
    request_id: str | None = None
    timeout: float | None = None
    priority: int = 0

    def __post_init__(self) -> None:
        if self.request_id is not None:
            check_request_id(self.request_id)
        if not isinstance(self.inputs, Mapping):
            raise InvalidInput(
                "inputs must be a mapping of input name -> array, e.g. {'x': array}; "
                f"got {type(self.inputs).__name__}",
                request_id=self.request_id,
            )


@dataclass(frozen=True)
class Prepared:
    """A checked request, packed for its stream, and that stream's length
    limit; ``seq`` is the counter of an id the client generated (None: the
    caller chose the id)."""

    request: Request
    limit: int
    payload: bytes
    seq: int | None = None


def wire_arrays(inputs: Mapping[str, Any]) -> dict[str, np.ndarray[Any, Any]]:
    """Numpy arrays or torch tensors (any device) as wire-storage arrays."""
    return {name: as_wire_array(value, name=f"input {name!r}") for name, value in inputs.items()}


def deadline_ms(timeout: object, request_id: str) -> int | None:
    """The unix-ms deadline of a request that may take ``timeout`` seconds."""
    if timeout is None:
        return None
    if not (isinstance(timeout, int | float) and 0 < timeout <= MAX_TIMEOUT_S):
        raise InvalidInput(
            f"timeout must be seconds in (0, {MAX_TIMEOUT_S:.0f}], got {timeout!r:.40}",
            request_id=request_id,
        )
    return int(time.time() * 1000 + timeout * 1000)


def prepare(
    submission: Submission,
    spec: ModelSpec,
    request_id: str,
    arrays: dict[str, np.ndarray[Any, Any]],
    reply_to: str,
    seq: int | None = None,
) -> Prepared:
    """Pack a submission whose inputs ``spec`` has accepted."""
    deadline = deadline_ms(submission.timeout, request_id)
    request = Request(request_id, submission.model, arrays, deadline, reply_to, submission.priority)
    try:
        payload = pack_request(request)
    except (OverflowError, ValueError, TypeError) as exc:  # e.g. a priority past int64
        raise InvalidInput(f"request cannot be encoded: {exc}", request_id=request_id) from None
    limit = int(spec.extra.get("max_queue_len", DEFAULT_MAX_QUEUE_LEN))
    return Prepared(request, limit, payload, seq)
