"""Smaller input checks: JSON numbers must fit their OIP datatype (no silent
infinity, no true/false among numbers), NaN/Infinity read and written as
Triton does, an unknown protocol version on a stream is refused, and
big-endian arrays are converted to the wire's byte order."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import numpy as np
import orjson
import pytest

from common.codec import CodecLimits, as_wire_array, encode_tensor
from common.envelope import (
    Request,
    Result,
    pack_request,
    pack_result,
    unpack_request,
    unpack_result,
)
from common.errors import ProtocolError
from producer.gateway.oip import OutputRequest, encode_response, parse_infer_request

LIMITS = CodecLimits()


def parse(datatype: str, data: Any, shape: list[int] | None = None) -> np.ndarray[Any, Any]:
    body = {"inputs": [{"name": "x", "datatype": datatype, "data": data,
                        "shape": shape if shape is not None else [len(data)]}]}  # fmt: skip
    return parse_infer_request(orjson.dumps(body), None, LIMITS).inputs["x"]


@pytest.mark.parametrize(
    ("datatype", "data", "match"),
    [
        ("FP32", [1e39], "value 1e+39 is beyond the FP32 range (largest finite 3.40282e+38)"),
        ("FP32", [1.0, -1e39], "value -1e+39 is beyond the FP32 range"),
        ("FP16", [70000], "value 70000 is beyond the FP16 range (largest finite 65504)"),
        ("FP16", [1.0, 65520.0], "beyond the FP16 range"),
        ("BF16", [3.4e38], "beyond the BF16 range (largest finite 3.38953e+38)"),
    ],
)
def test_floats_beyond_the_datatype_are_refused(datatype: str, data: list[Any], match: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse(datatype, data)
    assert match in info.value.message


def test_floats_at_the_edge_of_the_range_are_accepted() -> None:
    assert parse("FP16", [65504.0, -65504])[0] == 65504
    assert np.isfinite(parse("FP32", [3.4028234e38, 1e-50])).all()  # tiny ones round to 0
    assert parse("FP64", [1e300]).dtype == np.float64


@pytest.mark.parametrize(
    ("datatype", "data", "shape"),
    [
        ("FP32", [True], [1]),
        ("FP32", [1.0, True], [2]),
        ("FP32", [[1.0, 2.0], [3.0, False]], [2, 2]),
        ("INT32", [1, True], [2]),
        ("UINT8", [[0], [True]], [2, 1]),
    ],
)
def test_true_and_false_are_not_numbers(datatype: str, data: list[Any], shape: list[int]) -> None:
    with pytest.raises(ProtocolError, match="data must be"):
        parse(datatype, data, shape)


def test_bool_tensors_still_take_true_and_false() -> None:
    assert parse("BOOL", [True, False]).tolist() == [True, False]


def test_nan_and_infinity_are_read_as_triton_writes_them() -> None:
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], ' \
           b'"data": [NaN, Infinity, -Infinity]}], "id": "r1"}'  # fmt: skip
    parsed = parse_infer_request(body, None, LIMITS)
    values = parsed.inputs["x"]
    assert np.isnan(values[0]) and values[1] == np.inf and values[2] == -np.inf
    assert parsed.id == "r1"
    with pytest.raises(ProtocolError, match="number 1e400 is out of range"):
        parse_infer_request(body.replace(b"Infinity,", b"1e400,"), None, LIMITS)
    with pytest.raises(ProtocolError, match="malformed JSON"):
        parse_infer_request(b'{"inputs": [NaN', None, LIMITS)


def test_non_finite_outputs_are_written_nan_and_infinity() -> None:
    outputs: dict[str, np.ndarray[Any, Any]] = {
        "y": np.array([1.5, np.nan, -np.inf, np.inf, 2.0], np.float32),
        "h": np.array([0x7FC0, 0x3F80], np.uint16),  # BF16 bits: NaN, 1.0
        "i": np.array([1, 2], np.int64),
        "f": np.array([0.25], np.float64),
    }
    body, header_length = encode_response(
        model_name="m", model_version="", request_id="r", outputs=outputs, wanted=OutputRequest()
    )
    assert header_length is None
    assert b'"data":[1.5,NaN,-Infinity,Infinity,2.0]' in body
    assert b'"data":[NaN,1.0]' in body
    assert b'"data":[1,2]' in body and b'"data":[0.25]' in body
    doc = json.loads(body)  # Python reads the extension, as Triton's clients do
    data = doc["outputs"][0]["data"]
    assert data[0] == 1.5 and np.isnan(data[1]) and data[2:] == [-np.inf, np.inf, 2.0]
    assert parse("FP32", [1.5])[0] == 1.5  # and what it writes, it reads back
    again = parse_infer_request(
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[5],"data":'
        + body.split(b'"data":', 1)[1].split(b"]", 1)[0]
        + b"]}]}",
        None,
        LIMITS,
    ).inputs["x"]
    np.testing.assert_array_equal(again, outputs["y"])


# --------------------------------------------------------------------------- the stream


def test_an_unknown_protocol_version_is_refused_naming_it() -> None:
    body = msgpack.unpackb(pack_request(Request("r1", "m", {"x": np.ones((1, 2), np.float32)})))
    body["v"] = 99
    with pytest.raises(ProtocolError) as info:
        unpack_request(msgpack.packb(body, use_bin_type=True))
    assert "protocol version 99" in info.value.message
    assert info.value.request_id == "r1"  # so the worker can answer it
    body["v"] = "1"
    with pytest.raises(ProtocolError, match="protocol version '1'"):
        unpack_request(msgpack.packb(body, use_bin_type=True))
    del body["v"]  # a producer that leaves it out speaks version 1
    assert unpack_request(msgpack.packb(body, use_bin_type=True)).id == "r1"


def test_a_result_of_an_unknown_version_is_refused() -> None:
    body = msgpack.unpackb(pack_result(Result("r1", "ok", {"y": np.ones(2, np.float32)})))
    body["v"] = 2
    with pytest.raises(ProtocolError, match="protocol version 2") as info:
        unpack_result(msgpack.packb(body, use_bin_type=True))
    assert info.value.request_id == "r1"


# --------------------------------------------------------------------------- byte order


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i8", ">i4", ">i2", ">f2"])
def test_big_endian_arrays_are_converted_to_little_endian(dtype: str) -> None:
    array = np.arange(6, dtype=dtype).reshape(2, 3)
    wire = as_wire_array(array, name="input 'x'")
    assert wire.dtype.byteorder in ("<", "=", "|")
    np.testing.assert_array_equal(wire, array)
    tensor = encode_tensor(wire)
    assert bytes(tensor["data"]) == array.astype(dtype.replace(">", "<")).tobytes()


def test_little_endian_arrays_are_not_copied() -> None:
    array = np.arange(6, dtype="<f4")
    assert as_wire_array(array) is array
