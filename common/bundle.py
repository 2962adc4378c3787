"""Bundles: many requests for one model in one stream entry, and many ``ok``
results of one batch in one inbox element (docs/protocol.md, "Bundles").

A request bundle is a msgpack map with ``ids`` (instead of a single
request's ``id``): the members' ids, their ``rows``, and each input either
stacked (one tensor, the members' rows one after another) or listed (one
tensor per member, for members whose shapes differ). ``deadline``,
``reply_to``, ``priority`` and ``store`` are one value for all members or an
array of one per member. A result bundle is the same idea backwards: ``ids``,
``rows`` and stacked ``outputs`` of members that all succeeded together.

Decoding validates per member where it can: a member whose own fields are
malformed is reported in ``BundleRequest.errors`` and the others stay good;
what breaks the whole bundle (its rows do not add up, a stacked tensor is
malformed) is an error of every member.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from common.codec import DEFAULT_LIMITS, CodecLimits, decode_tensor, encode_tensor
from common.envelope import (
    PROTOCOL_VERSION,
    Arrays,
    Request,
    Result,
    Timings,
    check_version,
    request_of,
    unpack_map,
    unpack_result,
)
from common.errors import ProtocolError


@dataclass
class BundleRequest:
    """A decoded request bundle. ``inputs`` holds every input stacked over
    the members (``offsets`` give member i rows offsets[i]:offsets[i+1]);
    when some input was listed per member, ``member_inputs`` holds each
    member's own arrays instead and ``inputs`` is None."""

    model: str
    ids: list[str | None]  # None: unreadable, the member cannot be answered
    offsets: list[int]
    inputs: Arrays | None
    member_inputs: list[Arrays | None] | None
    deadlines: list[int | None]
    reply_to: list[str | None]
    priority: list[int]
    store: list[bool]
    errors: dict[int, ProtocolError] = field(default_factory=dict)  # member index -> problem

    def __len__(self) -> int:
        return len(self.ids)


def is_bundle(body: Mapping[Any, Any]) -> bool:
    return "ids" in body


def is_bundle_payload(payload: bytes) -> bool:
    """Whether raw ``req`` bytes hold a bundle (False for anything unreadable)."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several unrelated types on garbage
        return False
    return isinstance(body, dict) and is_bundle(body)


def pack_bundle(requests: Sequence[Request]) -> bytes:
    """One stream entry for ``requests`` (same model; already checked): each
    input stacked when every member's per-row shape and dtype agree, else
    listed; per-member fields as one value when all members share it."""
    first = requests[0]
    inputs: dict[str, Any] = {}
    rows: list[int] = []
    for name in first.inputs:
        arrays = [r.inputs[name] for r in requests]
        if not rows:
            rows = [a.shape[0] for a in arrays]
        head = arrays[0]
        if all(a.dtype == head.dtype and a.shape[1:] == head.shape[1:] for a in arrays):
            stacked = np.concatenate(arrays, axis=0) if len(arrays) > 1 else head
            inputs[name] = encode_tensor(stacked)
        else:
            inputs[name] = [encode_tensor(a) for a in arrays]
    body: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "model": first.model,
        "ids": [r.id for r in requests],
        "rows": rows,
        "inputs": inputs,
    }
    _put_compact(body, "deadline", [r.deadline_ms for r in requests], None)
    _put_compact(body, "reply_to", [r.reply_to for r in requests], None)
    _put_compact(body, "priority", [r.priority for r in requests], 0)
    _put_compact(body, "store", [r.store for r in requests], True)
    return msgpack.packb(body, use_bin_type=True)


def _put_compact(body: dict[str, Any], key: str, values: list[Any], default: Any) -> None:
    first = values[0]
    if all(v == first for v in values):
        if first != default:
            body[key] = first
    else:
        body[key] = values


def unpack_bundle(body: Mapping[Any, Any], limits: CodecLimits = DEFAULT_LIMITS) -> BundleRequest:
    """Decode a request bundle map (``is_bundle``). ProtocolError (no id) only
    when no member can be named; everything else lands in ``errors``."""
    raw_ids = body.get("ids")
    if not isinstance(raw_ids, list) or not raw_ids:
        raise ProtocolError("bundle: 'ids' must be a non-empty array of strings")
    n = len(raw_ids)
    ids: list[str | None] = [i if isinstance(i, str) and i else None for i in raw_ids]
    errors: dict[int, ProtocolError] = {}
    for i, request_id in enumerate(ids):
        if request_id is None:
            errors[i] = ProtocolError(f"bundle member {i}: 'id' must be a non-empty string")
    bundle = BundleRequest("", ids, [], None, None, [None] * n, [None] * n, [0] * n, [True] * n,
                           errors)  # fmt: skip
    try:
        check_version(body, "bundle")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ProtocolError("bundle: 'model' must be a non-empty string")
        bundle.model = model
        bundle.deadlines = _per_member(body, "deadline", n, None, _deadline, errors)
        bundle.reply_to = _per_member(body, "reply_to", n, None, _reply_to, errors)
        bundle.priority = _per_member(body, "priority", n, 0, _priority, errors)
        bundle.store = _per_member(body, "store", n, True, _store, errors)
        _decode_inputs(body, bundle, limits)
    except ProtocolError as exc:  # the whole bundle: every member gets it
        for i in range(n):
            errors.setdefault(i, ProtocolError(exc.message))
    for i, request_id in enumerate(ids):
        if i in errors and request_id is not None:
            errors[i] = ProtocolError(errors[i].message, request_id=request_id)
    return bundle


def _decode_inputs(body: Mapping[Any, Any], bundle: BundleRequest, limits: CodecLimits) -> None:
    n = len(bundle.ids)
    raw_inputs = body.get("inputs")
    if not isinstance(raw_inputs, Mapping) or not raw_inputs:
        raise ProtocolError("bundle: 'inputs' must be a non-empty map of name -> tensor")
    raw_rows = body.get("rows")
    rows: list[int] | None = None
    if raw_rows is not None:
        if (
            not isinstance(raw_rows, list)
            or len(raw_rows) != n
            or not all(type(r) is int and r >= 1 for r in raw_rows)
        ):
            raise ProtocolError(f"bundle: 'rows' must be {n} ints >= 1, one per member")
        rows = raw_rows
    stacked: Arrays = {}
    listed: dict[str, list[np.ndarray[Any, Any] | None]] = {}
    for name, value in raw_inputs.items():
        if not isinstance(name, str):
            raise ProtocolError("bundle: input names must be strings")
        if isinstance(value, list):
            if len(value) != n:
                raise ProtocolError(
                    f"bundle: input {name!r} lists {len(value)} tensors for {n} members"
                )
            column: list[np.ndarray[Any, Any] | None] = []
            for i, tensor in enumerate(value):
                try:
                    column.append(decode_tensor(tensor, limits, name=f"input {name!r}"))
                except ProtocolError as exc:
                    bundle.errors.setdefault(i, ProtocolError(f"bundle member {i}: {exc.message}"))
                    column.append(None)
            listed[name] = column
            continue
        array = decode_tensor(value, limits, name=f"input {name!r}")
        if rows is None:
            raise ProtocolError(f"bundle: stacked input {name!r} needs 'rows'")
        if array.ndim == 0 or array.shape[0] != sum(rows):
            raise ProtocolError(
                f"bundle: stacked input {name!r} has shape {list(array.shape)}, "
                f"its members' rows add up to {sum(rows)}"
            )
        stacked[name] = array
    if rows is None:  # every input listed: the rows are the tensors' own
        rows = [1] * n
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + r)
    bundle.offsets = offsets
    if not listed:
        bundle.inputs = stacked
        return
    members: list[Arrays | None] = []
    for i in range(n):
        own: Arrays = {k: a[offsets[i] : offsets[i + 1]] for k, a in stacked.items()}
        broken = False
        for name, column in listed.items():
            tensor = column[i]
            if tensor is None:
                broken = True
            else:
                own[name] = tensor
        members.append(None if broken else own)
    bundle.member_inputs = members


def _per_member(
    body: Mapping[Any, Any],
    key: str,
    n: int,
    default: Any,
    check: Any,
    errors: dict[int, ProtocolError],
) -> list[Any]:
    """A per-member field: absent (the default for all), one value for all,
    or an array of n values (a bad one is that member's error)."""
    value = body.get(key, default)
    if not isinstance(value, list):
        check(value)  # a bad shared value breaks the whole bundle
        return [value] * n
    if len(value) != n:
        raise ProtocolError(f"bundle: {key!r} holds {len(value)} values for {n} members")
    out: list[Any] = []
    for i, item in enumerate(value):
        try:
            check(item)
            out.append(item)
        except ProtocolError as exc:
            errors.setdefault(i, ProtocolError(f"bundle member {i}: {exc.message}"))
            out.append(default)
    return out


def _deadline(value: Any) -> None:
    if value is not None and type(value) is not int:
        raise ProtocolError("'deadline' must be an int (unix ms)")


def _reply_to(value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise ProtocolError("'reply_to' must be a string")


def _priority(value: Any) -> None:
    if type(value) is not int:
        raise ProtocolError("'priority' must be an int")


def _store(value: Any) -> None:
    if type(value) is not bool:
        raise ProtocolError("'store' must be true or false")


# -- results ----------------------------------------------------------------------


def pack_result_bundle(
    ids: Sequence[str],
    rows: Sequence[int],
    outputs: Arrays,
    output_dtypes: Mapping[str, str],
    timings: Timings,
) -> bytes:
    """The ``ok`` results of members computed together, outputs stacked."""
    body = {
        "v": PROTOCOL_VERSION,
        "ids": list(ids),
        "rows": list(rows),
        "status": "ok",
        "outputs": {k: encode_tensor(v, output_dtypes.get(k)) for k, v in outputs.items()},
        **timings.fields(),
    }
    return msgpack.packb(body, use_bin_type=True)


def unpack_results(payload: bytes, limits: CodecLimits = DEFAULT_LIMITS) -> list[Result]:
    """The results in one inbox element: a single result map, or a result
    bundle split into one Result per member (outputs are row views)."""
    body = unpack_map(payload, limits, "result")
    if not is_bundle(body):
        return [unpack_result(payload, limits, body=body)]
    ids, rows, outputs = body.get("ids"), body.get("rows"), body.get("outputs")
    if (
        not isinstance(ids, list)
        or not all(isinstance(i, str) for i in ids)
        or not isinstance(rows, list)
        or len(rows) != len(ids)
        or not all(type(r) is int and r >= 0 for r in rows)
        or body.get("status") != "ok"
        or not isinstance(outputs, Mapping)
    ):
        raise ProtocolError(
            "result bundle: needs 'ids', 'rows' (one per id), 'status' ok and 'outputs'"
        )
    check_version(body, "result bundle")
    arrays = {str(k): decode_tensor(v, limits, name=f"output {k!r}") for k, v in outputs.items()}
    total = sum(rows)
    if any(a.ndim == 0 or a.shape[0] != total for a in arrays.values()):
        raise ProtocolError(f"result bundle: outputs must have {total} rows, the members' sum")
    queued_ms, infer_ms, batch_size, worker = Timings.read(body, "result bundle")
    results = []
    start = 0
    for request_id, n in zip(ids, rows, strict=True):
        end = start + n
        own = {k: a[start:end] for k, a in arrays.items()}
        results.append(
            Result(request_id, "ok", own, "", "", queued_ms, infer_ms, batch_size, worker)
        )
        start = end
    return results


def unpack_entry(payload: bytes, limits: CodecLimits = DEFAULT_LIMITS) -> Request | BundleRequest:
    """A stream entry's ``req`` field: a single request or a bundle."""
    body = unpack_map(payload, limits, "request")
    if is_bundle(body):
        return unpack_bundle(body, limits)
    return request_of(body, limits)
