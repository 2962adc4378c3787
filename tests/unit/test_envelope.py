"""Request and result envelopes (common.envelope): round trips, the raw wire maps
they produce, and the request id carried by ProtocolError."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from common.codec import CodecLimits
from common.envelope import (
    PROTOCOL_VERSION,
    STATUSES,
    Request,
    Result,
    pack_request,
    pack_result,
    unpack_request,
    unpack_result,
)
from common.errors import ProtocolError


def raw(payload: bytes) -> dict[str, Any]:
    return msgpack.unpackb(payload, raw=False)


def repack(body: dict[str, Any]) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def sample_inputs() -> dict[str, np.ndarray[Any, Any]]:
    return {
        "x": np.arange(8, dtype=np.float32).reshape(2, 4),
        "ids": np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int64),
        "h": np.array([[0x3F80], [0xC000]], dtype=np.uint16),  # bfloat16 bits: 1.0, -2.0
    }


def assert_arrays_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert set(got) == set(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        assert got[name].tobytes() == array.tobytes(), name


# --------------------------------------------------------------------------- requests


def test_request_round_trip_with_all_fields() -> None:
    request = Request(
        "r-1",
        "mlp",
        sample_inputs(),
        deadline_ms=1_750_000_000_123,
        reply_to="tq:inbox:client-7",
        priority=5,
    )
    back = unpack_request(pack_request(request))
    assert (back.id, back.model) == ("r-1", "mlp")
    assert back.deadline_ms == 1_750_000_000_123
    assert back.reply_to == "tq:inbox:client-7"
    assert back.priority == 5
    assert_arrays_equal(back.inputs, request.inputs)
    assert all(not a.flags.writeable for a in back.inputs.values())


def test_request_wire_map_fields() -> None:
    request = Request("r-1", "mlp", sample_inputs(), deadline_ms=12, reply_to="tq:inbox:c")
    body = raw(pack_request(request))
    assert body["v"] == PROTOCOL_VERSION == 1
    assert set(body) == {"v", "id", "model", "inputs", "deadline", "reply_to"}
    assert body["inputs"]["h"]["dtype"] == "bfloat16"
    assert body["inputs"]["x"] == {
        "dtype": "float32",
        "shape": [2, 4],
        "data": np.arange(8, dtype="<f4").tobytes(),
    }


def test_request_optional_fields_are_omitted_and_default() -> None:
    payload = pack_request(Request("r-2", "m", {"x": np.zeros((1, 1), np.int8)}))
    assert set(raw(payload)) == {"v", "id", "model", "inputs"}
    back = unpack_request(payload)
    assert back.deadline_ms is None
    assert back.reply_to is None
    assert back.priority == 0


def test_request_from_a_foreign_producer_is_accepted() -> None:
    # a hand-built map, as a Go or Node producer would write it
    body = {
        "v": 1,
        "id": "go-1",
        "model": "mlp",
        "inputs": {"x": {"dtype": "int32", "shape": [1, 2], "data": b"\x01\0\0\0\x02\0\0\0"}},
        "deadline": 0,
        "priority": -3,
    }
    back = unpack_request(repack(body))
    assert back.inputs["x"].tolist() == [[1, 2]]
    assert back.deadline_ms == 0
    assert back.priority == -3


@pytest.mark.parametrize(
    "inputs",
    [
        [],
        {},
        {"x": "not a tensor"},
        {"x": {"dtype": "float32", "shape": [1, 2], "data": b"\0" * 4}},
        {"x": {"dtype": "complex64", "shape": [1], "data": b"\0" * 8}},
        {"x": {"dtype": "int8", "shape": [1, -1], "data": b""}},
        {"ok": {"dtype": "int8", "shape": [1], "data": b"\0"}, "bad": None},
    ],
)
def test_bad_inputs_carry_the_readable_request_id(inputs: Any) -> None:
    payload = repack({"v": 1, "id": "r-42", "model": "mlp", "inputs": inputs})
    with pytest.raises(ProtocolError) as info:
        unpack_request(payload)
    assert info.value.request_id == "r-42"
    assert "r-42" in str(info.value)


def test_input_name_is_named_in_the_error() -> None:
    payload = repack(
        {
            "id": "r-1",
            "model": "m",
            "inputs": {"pixels": {"dtype": "nope", "shape": [], "data": b""}},
        }
    )
    with pytest.raises(ProtocolError, match="pixels"):
        unpack_request(payload)


def test_payload_limits_apply_to_request_inputs() -> None:
    request = Request("r-big", "m", {"x": np.zeros((1, 100), np.float32)})
    with pytest.raises(ProtocolError) as info:
        unpack_request(pack_request(request), CodecLimits(max_payload_bytes=200))
    assert info.value.request_id == "r-big"
    assert unpack_request(pack_request(request), CodecLimits(max_payload_bytes=400)).id == "r-big"


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "inputs": {}},
        {"id": "", "model": "m", "inputs": {}},
        {"id": 7, "model": "m", "inputs": {}},
        {"id": ["r-1"], "model": "m", "inputs": {}},
    ],
)
def test_without_a_readable_id_request_id_is_none(body: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        unpack_request(repack(body))
    assert info.value.request_id is None


@pytest.mark.parametrize(
    "payload", [b"", b"\xc1", b"\x93\x01\x02\x03", repack("r-1"), repack(None), "text"]
)
def test_non_map_payloads_have_no_request_id(payload: Any) -> None:
    with pytest.raises(ProtocolError) as info:
        unpack_request(payload)
    assert info.value.request_id is None


# --------------------------------------------------------------------------- results


def test_ok_result_round_trip() -> None:
    outputs = {
        "y": np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3),
        "label": np.array([3, 1], dtype=np.int64),
    }
    result = Result(
        "r-1",
        "ok",
        outputs=outputs,
        queued_ms=1.23456,
        infer_ms=7.5,
        batch_size=32,
        worker="host-a/cuda:0/1",
    )
    payload = pack_result(result)
    body = raw(payload)
    assert body["v"] == 1
    assert body["status"] == "ok"
    assert "error" not in body
    assert body["queued_ms"] == 1.235  # rounded to microseconds
    back = unpack_result(payload)
    assert (back.id, back.status, back.batch_size, back.worker) == (
        "r-1",
        "ok",
        32,
        "host-a/cuda:0/1",
    )
    assert back.queued_ms == pytest.approx(1.235)
    assert back.infer_ms == 7.5
    assert (back.error_code, back.error_message) == ("", "")
    assert_arrays_equal(back.outputs, outputs)


def test_ok_result_with_bfloat16_output() -> None:
    bits = np.array([[0x3F80, 0x4000]], dtype=np.uint16)
    payload = pack_result(Result("r-1", "ok", outputs={"z": bits}), {"z": "bfloat16"})
    assert raw(payload)["outputs"]["z"]["dtype"] == "bfloat16"
    back = unpack_result(payload)
    assert back.outputs["z"].dtype == np.uint16
    assert back.outputs["z"].tolist() == [[0x3F80, 0x4000]]


def test_ok_result_with_no_outputs_is_an_empty_map() -> None:
    payload = pack_result(Result("r-1", "ok"))
    assert raw(payload)["outputs"] == {}
    assert unpack_result(payload).outputs == {}


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        ("error", "model_error", "RuntimeError: shape mismatch"),
        ("error", "invalid_input", "input 'x': dtype int64, model wants float32"),
        ("expired", "expired", "deadline passed 12 ms before dequeue"),
        ("cancelled", "cancelled", "cancelled by the producer"),
    ],
)
def test_failure_result_round_trip(status: str, code: str, message: str) -> None:
    result = Result.failure("r-9", status, code, message, worker="w1")  # type: ignore[arg-type]
    payload = pack_result(result)
    body = raw(payload)
    assert body["status"] == status
    assert body["error"] == {"code": code, "message": message}
    assert "outputs" not in body
    back = unpack_result(payload)
    assert (back.id, back.status, back.error_code, back.error_message, back.worker) == (
        "r-9",
        status,
        code,
        message,
        "w1",
    )
    assert back.outputs == {}


def test_statuses_are_the_documented_set() -> None:
    assert STATUSES == ("ok", "error", "expired", "cancelled")


@pytest.mark.parametrize(
    "body",
    [
        {"status": "ok", "outputs": {}},
        {"id": "r-1", "status": "done"},
        {"id": "r-1"},
        {"id": 5, "status": "ok", "outputs": {}},
    ],
)
def test_result_without_id_or_known_status_is_a_protocol_error(body: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        unpack_result(repack(body))


@pytest.mark.parametrize(
    "extra",
    [
        {"outputs": None},
        {"outputs": {"y": {"dtype": "float32", "shape": [2], "data": b"\0"}}},
        {"queued_ms": "slow"},
        {"infer_ms": None},
        {"batch_size": [1]},
        {"batch_size": float("inf")},
    ],
)
def test_malformed_result_fields_carry_the_request_id(extra: dict[str, Any]) -> None:
    body = {"v": 1, "id": "r-5", "status": "ok", "outputs": {}, **extra}
    with pytest.raises(ProtocolError) as info:
        unpack_result(repack(body))
    assert info.value.request_id == "r-5"
