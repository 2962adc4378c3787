"""What a request is made of before it is enqueued: ``Submission`` (one
request for ``submit_many``), and the checks that turn it into a
``Prepared`` request (inputs as wire arrays, the timeout as a deadline)
that the enqueuer packs, alone or in a bundle with others. Whatever is
wrong with one submission fails it alone, before it joins other
submitters' round trip."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.codec import as_wire_array
from common.envelope import Request
from common.errors import InvalidInput
from common.ids import check_request_id
from common.spec import ModelSpec

# Longest timeout a request may carry: its deadline must stay a sane int64 of ms.
MAX_TIMEOUT_S = 10 * 365 * 24 * 3600.0

INT64 = (-(2**63), 2**63 - 1)  # what a msgpack int may carry

# A model's queue limit when its published metadata names none.
DEFAULT_MAX_QUEUE_LEN = 100_000


@dataclass(slots=True)
class Submission:
    """One request for ``submit_many``. ``InvalidInput`` at once for inputs
    that are no mapping or a ``request_id`` outside the id rule (common/ids.py)."""

    model: str
    inputs: Mapping[str, Any]
    request_id: str | None = None
    timeout: float | None = None
    priority: int = 0
    store: bool = True  # keep the result under tq:r:<id>, where any client can read it by id

    def __post_init__(self) -> None:
        if self.request_id is not None:
            check_request_id(self.request_id)
        if type(self.inputs) is not dict and not isinstance(self.inputs, Mapping):
            raise InvalidInput(
                "inputs must be a mapping of input name -> array, e.g. {'x': array}; "
                f"got {type(self.inputs).__name__}",
                request_id=self.request_id,
            )


@dataclass(slots=True)
class Prepared:
    """A checked request, its stream's length limit and the rows a bundle of
    it may hold (the model's max_batch_size); ``seq`` is the counter of an id
    the client generated (None: the caller chose the id)."""

    request: Request
    limit: int
    bundle_rows: int
    rows: int
    seq: int | None = None

    @property
    def input_bytes(self) -> int:
        """Bytes of input it carries (what bundles and early sends are sized by)."""
        return sum(a.nbytes for a in self.request.inputs.values())


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
    rows: int,
    reply_to: str,
    seq: int | None = None,
) -> Prepared:
    """A submission whose inputs ``spec`` has accepted (``rows`` of them)."""
    timeout = submission.timeout
    deadline = None if timeout is None else deadline_ms(timeout, request_id)
    priority = submission.priority
    if type(priority) is not int or not INT64[0] <= priority <= INT64[1]:
        raise InvalidInput(
            f"priority must be an int64, got {priority!r:.40}", request_id=request_id
        )
    request = Request(request_id, submission.model, arrays, deadline, reply_to, priority,
                      bool(submission.store))  # fmt: skip
    limit = int(spec.extra.get("max_queue_len", DEFAULT_MAX_QUEUE_LEN))
    return Prepared(request, limit, spec.max_batch_size, rows, seq)
