"""Property tests of the wire tensor codec (common.codec) and of envelope decoding
robustness: every wire dtype round-trips bit-exactly through msgpack, decoding is
zero-copy and read-only, and every malformed payload is a ProtocolError."""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.codec import (
    DEFAULT_LIMITS,
    WIRE_DTYPES,
    CodecLimits,
    as_wire_array,
    bf16_bits_to_float32,
    decode_tensor,
    encode_tensor,
    wire_dtype_of,
)
from common.envelope import Request, pack_request, unpack_request, unpack_result
from common.errors import ProtocolError

FAST = settings(max_examples=150, deadline=None, database=None)

DTYPE_NAMES = sorted(WIRE_DTYPES)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)


@st.composite
def wire_arrays(draw: st.DrawFn) -> tuple[str, np.ndarray[Any, Any]]:
    """A wire dtype name and an array in its storage dtype (bfloat16 as uint16 bits)."""
    name = draw(st.sampled_from(DTYPE_NAMES))
    array = draw(hnp.arrays(WIRE_DTYPES[name], SHAPES))
    return name, array


def over_msgpack(tensor: dict[str, Any]) -> dict[str, Any]:
    """What a remote peer sees: the map packed and unpacked as the wire protocol says."""
    return msgpack.unpackb(msgpack.packb(tensor, use_bin_type=True), raw=False)


def tensor_map(dtype: str, shape: list[Any], data: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data": data}


# --------------------------------------------------------------------------- round trips


def test_wire_dtypes_are_the_documented_set() -> None:
    assert set(WIRE_DTYPES) == {
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
    }
    assert WIRE_DTYPES["bfloat16"] == np.dtype("<u2")
    for dtype in WIRE_DTYPES.values():
        assert dtype.byteorder in ("<", "|", "=")


@FAST
@given(wire_arrays())
def test_round_trip_is_bit_exact(case: tuple[str, np.ndarray[Any, Any]]) -> None:
    name, array = case
    wire = over_msgpack(encode_tensor(array, name))
    assert wire["dtype"] == name
    assert wire["shape"] == list(array.shape)
    assert isinstance(wire["data"], bytes)
    assert len(wire["data"]) == array.size * array.itemsize
    decoded = decode_tensor(wire)
    assert decoded.dtype == WIRE_DTYPES[name]
    assert decoded.shape == array.shape
    assert decoded.tobytes() == array.tobytes()


@FAST
@given(wire_arrays())
def test_dtype_name_is_inferred_from_the_array(case: tuple[str, np.ndarray[Any, Any]]) -> None:
    name, array = case
    # uint16 only ever carries bfloat16 bits inside tensorq, so inference is unambiguous
    assert wire_dtype_of(array) == name
    assert encode_tensor(array)["dtype"] == name


@FAST
@given(wire_arrays())
def test_decoded_arrays_are_read_only_zero_copy_views(
    case: tuple[str, np.ndarray[Any, Any]],
) -> None:
    name, array = case
    wire = over_msgpack(encode_tensor(array, name))
    decoded = decode_tensor(wire)
    assert not decoded.flags.writeable
    assert not decoded.flags.owndata
    assert decoded.base is not None
    if decoded.size:
        assert np.shares_memory(decoded, np.frombuffer(wire["data"], dtype=np.uint8))
        with pytest.raises(ValueError):
            decoded.flat[0] = decoded.flat[0]


def test_encoding_a_contiguous_little_endian_array_does_not_copy() -> None:
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    data = encode_tensor(array)["data"]
    assert np.shares_memory(np.frombuffer(data, dtype=np.uint8), array)


@FAST
@given(wire_arrays(), st.data())
def test_non_contiguous_inputs_encode_in_c_order(
    case: tuple[str, np.ndarray[Any, Any]], data: st.DataObject
) -> None:
    name, array = case
    if array.ndim == 0:
        array = array.reshape(1)
    view = array.T if data.draw(st.booleans(), label="transpose") else array[::-1]
    step = data.draw(st.integers(1, 3), label="step")
    view = view[::step]
    wire = over_msgpack(encode_tensor(view, name))
    decoded = decode_tensor(wire)
    assert decoded.shape == view.shape
    assert decoded.tobytes() == np.ascontiguousarray(view).tobytes()
    assert decoded.flags.c_contiguous


@FAST
@given(wire_arrays())
def test_big_endian_inputs_travel_little_endian(case: tuple[str, np.ndarray[Any, Any]]) -> None:
    name, array = case
    swapped = array.astype(array.dtype.newbyteorder(">"))
    assert np.array_equal(swapped, array, equal_nan=array.dtype.kind == "f")
    wire = encode_tensor(swapped)  # the dtype name is inferred whatever the byte order
    assert wire["dtype"] == name
    assert bytes(wire["data"]) == array.tobytes()  # array is little-endian storage
    decoded = decode_tensor(over_msgpack(wire))
    assert decoded.dtype == WIRE_DTYPES[name]
    assert decoded.tobytes() == array.tobytes()


def test_zero_dim_and_empty_arrays_keep_their_shape() -> None:
    scalar = np.array(2.5, dtype=np.float32)
    wire = over_msgpack(encode_tensor(scalar))
    assert wire["shape"] == []
    assert decode_tensor(wire).shape == ()
    assert decode_tensor(wire)[()] == 2.5
    empty = np.zeros((3, 0, 2), dtype=np.int64)
    wire = over_msgpack(encode_tensor(empty))
    assert wire["shape"] == [3, 0, 2]
    assert wire["data"] == b""
    assert decode_tensor(wire).shape == (3, 0, 2)


# --------------------------------------------------------------------------- bad tensors


@FAST
@given(
    st.text(max_size=12).filter(lambda s: s not in WIRE_DTYPES),
    st.binary(max_size=16),
)
def test_unknown_dtype_is_a_protocol_error(dtype: str, data: bytes) -> None:
    with pytest.raises(ProtocolError, match="unknown dtype"):
        decode_tensor(tensor_map(dtype, [len(data)], data))


@pytest.mark.parametrize("name", ["uint16", "uint32", "uint64", "complex64", "float128", "str"])
def test_non_wire_numpy_names_are_unknown_dtypes(name: str) -> None:
    with pytest.raises(ProtocolError, match="unknown dtype"):
        decode_tensor(tensor_map(name, [1], b"\0" * 2))


@FAST
@given(wire_arrays(), st.integers(-8, 8).filter(bool))
def test_shape_and_length_mismatch_is_a_protocol_error(
    case: tuple[str, np.ndarray[Any, Any]], delta: int
) -> None:
    name, array = case
    data = array.tobytes()
    data = data + b"\x01" * delta if delta > 0 else data[:delta]
    if len(data) == array.nbytes:  # an empty array cannot be shortened
        data += b"\x01"
    with pytest.raises(ProtocolError, match="needs"):
        decode_tensor(tensor_map(name, list(array.shape), data))


@FAST
@given(
    st.sampled_from(DTYPE_NAMES),
    st.lists(st.integers(0, 4), max_size=3),
    st.one_of(
        st.integers(min_value=-(2**63), max_value=-1),
        st.floats(allow_nan=True),
        st.booleans(),
        st.none(),
        st.text(max_size=3),
        st.lists(st.integers(0, 3), max_size=2),
    ),
    st.data(),
)
def test_negative_or_non_int_dims_are_protocol_errors(
    dtype: str, dims: list[int], bad: Any, data: st.DataObject
) -> None:
    at = data.draw(st.integers(0, len(dims)), label="position")
    shape = [*dims[:at], bad, *dims[at:]]
    with pytest.raises(ProtocolError, match="shape"):
        decode_tensor(over_msgpack(tensor_map(dtype, shape, b"")))


@pytest.mark.parametrize("shape", [None, 3, "3", {"a": 1}, b"\x03"])
def test_shape_that_is_not_a_list_is_a_protocol_error(shape: Any) -> None:
    with pytest.raises(ProtocolError, match="shape"):
        decode_tensor(tensor_map("float32", shape, b"\0" * 12))


@pytest.mark.parametrize("data", [None, "abcd", 4, [1, 2, 3, 4], {"x": 1}])
def test_data_that_is_not_binary_is_a_protocol_error(data: Any) -> None:
    with pytest.raises(ProtocolError, match="binary"):
        decode_tensor(tensor_map("uint8", [4], data))


@pytest.mark.parametrize("limits", [DEFAULT_LIMITS, CodecLimits(max_dims=2)])
def test_too_many_dims_is_a_protocol_error(limits: CodecLimits) -> None:
    ok = [1] * limits.max_dims
    assert decode_tensor(tensor_map("int8", ok, b"\x07"), limits).shape == tuple(ok)
    with pytest.raises(ProtocolError, match="dims"):
        decode_tensor(tensor_map("int8", [*ok, 1], b"\x07"), limits)


def test_payload_over_the_limit_is_a_protocol_error() -> None:
    limits = CodecLimits(max_payload_bytes=64)
    assert decode_tensor(tensor_map("float32", [16], b"\0" * 64), limits).shape == (16,)
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_tensor(tensor_map("float32", [17], b"\0" * 68), limits)


@pytest.mark.parametrize(
    "shape",
    [[2**40, 2**40], [2**63, 2**63, 2**63], [2**64 - 1], [0, 2**63], [0, 2**62, 2**62]],
)
def test_huge_declared_shapes_fail_cleanly(shape: list[int]) -> None:
    # a claimed size must be refused before any allocation, even with zero data bytes
    with pytest.raises(ProtocolError):
        decode_tensor(over_msgpack(tensor_map("float64", shape, b"")))


GARBAGE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)


@FAST
@given(GARBAGE.filter(lambda v: not isinstance(v, dict)))
def test_non_map_garbage_is_a_protocol_error(garbage: Any) -> None:
    with pytest.raises(ProtocolError, match="expected a map"):
        decode_tensor(garbage)


@FAST
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "dtype": st.sampled_from(DTYPE_NAMES) | GARBAGE,
            "shape": st.lists(st.integers(-2, 6), max_size=10) | GARBAGE,
            "data": st.binary(max_size=48) | GARBAGE,
        },
    )
)
def test_fuzzed_tensor_maps_decode_or_raise_protocol_error(obj: dict[str, Any]) -> None:
    try:
        array = decode_tensor(over_msgpack(obj))
    except ProtocolError:
        return
    assert array.shape == tuple(obj["shape"])
    assert array.tobytes() == obj["data"]


# --------------------------------------------------------------------------- envelopes


@FAST
@given(st.binary(max_size=256))
def test_random_bytes_never_crash_unpack_request(payload: bytes) -> None:
    try:
        request = unpack_request(payload)
    except ProtocolError:
        return
    assert isinstance(request, Request)


@FAST
@given(st.binary(max_size=256))
def test_random_bytes_never_crash_unpack_result(payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        unpack_result(payload)


def _valid_request_bytes() -> bytes:
    return pack_request(
        Request(
            "req-1",
            "mlp",
            {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "m": np.ones((2,), np.bool_)},
            deadline_ms=1_700_000_000_000,
            reply_to="tq:inbox:c1",
            priority=2,
        )
    )


@FAST
@given(st.data())
def test_corrupted_valid_requests_never_crash(data: st.DataObject) -> None:
    payload = bytearray(_valid_request_bytes())
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        at = data.draw(st.integers(0, len(payload) - 1), label="at")
        payload[at] = data.draw(st.integers(0, 255), label="byte")
    cut = data.draw(st.integers(0, len(payload)), label="cut")
    with contextlib.suppress(ProtocolError):
        unpack_request(bytes(payload[:cut]))


@FAST
@given(GARBAGE)
def test_msgpack_garbage_requests_are_protocol_errors(garbage: Any) -> None:
    with pytest.raises(ProtocolError):
        unpack_request(msgpack.packb(garbage, use_bin_type=True))


WRONG_FIELDS = [
    ("id", 17),
    ("id", ""),
    ("id", None),
    ("id", b"req-1"),
    ("model", 3),
    ("model", ""),
    ("model", ["mlp"]),
    ("inputs", []),
    ("inputs", {}),
    ("inputs", "x"),
    ("inputs", {"x": [1, 2, 3]}),
    ("inputs", {1: {"dtype": "uint8", "shape": [1], "data": b"\0"}}),
    ("deadline", "tomorrow"),
    ("deadline", 1.5),
    ("deadline", True),
    ("reply_to", 5),
    ("reply_to", b"tq:inbox:c"),
    ("priority", "high"),
    ("priority", 1.0),
    ("priority", False),
]


@pytest.mark.parametrize(("field", "value"), WRONG_FIELDS)
def test_wrong_field_types_in_a_request_map(field: str, value: Any) -> None:
    body = msgpack.unpackb(_valid_request_bytes(), raw=False)
    body[field] = value
    with pytest.raises(ProtocolError) as info:
        unpack_request(msgpack.packb(body, use_bin_type=True))
    assert info.value.request_id == (None if field == "id" else "req-1")


def test_oversized_request_payload_is_refused_before_parsing() -> None:
    limits = CodecLimits(max_payload_bytes=16)
    with pytest.raises(ProtocolError, match="exceeds"):
        unpack_request(b"\x00" * (16 + 65536 + 1), limits)


# --------------------------------------------------------------------------- as_wire_array


def test_torch_float32_becomes_numpy_float32() -> None:
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # non-contiguous
    array = as_wire_array(tensor)
    assert isinstance(array, np.ndarray)
    assert array.dtype == np.float32
    assert np.array_equal(array, tensor.numpy())
    assert encode_tensor(array)["dtype"] == "float32"


def test_torch_tensor_with_grad_is_detached() -> None:
    tensor = torch.ones(2, 3, requires_grad=True) * 2
    assert np.array_equal(as_wire_array(tensor), np.full((2, 3), 2.0, np.float32))


@FAST
@given(hnp.arrays(np.float32, SHAPES, elements=st.floats(width=32)))
def test_torch_bfloat16_becomes_its_uint16_bits(values: np.ndarray[Any, Any]) -> None:
    tensor = torch.from_numpy(values.copy()).to(torch.bfloat16)
    bits = as_wire_array(tensor)
    assert bits.dtype == np.uint16
    assert bits.shape == tuple(tensor.shape)
    assert np.array_equal(bits, tensor.view(torch.int16).numpy().view(np.uint16))
    wire = over_msgpack(encode_tensor(bits))
    assert wire["dtype"] == "bfloat16"
    back = torch.from_numpy(decode_tensor(wire).view(np.int16).copy()).view(torch.bfloat16)
    assert back.shape == tensor.shape
    assert torch.equal(back.view(torch.int16), tensor.view(torch.int16))


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8]
)
def test_torch_dtypes_map_to_their_wire_names(dtype: torch.dtype) -> None:
    array = as_wire_array(torch.zeros(2, 2, dtype=dtype))
    assert wire_dtype_of(array) == str(dtype).removeprefix("torch.")


def test_torch_bool_maps_to_bool() -> None:
    assert wire_dtype_of(as_wire_array(torch.tensor([True, False]))) == "bool"


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
def test_numpy_uint16_is_refused(dtype: str) -> None:
    with pytest.raises(ProtocolError, match="not a wire dtype"):
        as_wire_array(np.arange(4, dtype=dtype), name="input 'x'")


@pytest.mark.parametrize("dtype", ["uint32", "uint64", "complex64", "U3", "O", "datetime64[s]"])
def test_other_non_wire_dtypes_are_refused(dtype: str) -> None:
    with pytest.raises(ProtocolError, match="input 'x'"):
        as_wire_array(np.zeros(2, dtype=dtype), name="input 'x'")


def test_python_sequences_are_accepted() -> None:
    assert as_wire_array([[1.0, 2.0]]).dtype == np.float64
    assert as_wire_array([1, 2]).dtype == np.int64


def test_big_endian_numpy_is_accepted_and_encoded_little_endian() -> None:
    array = as_wire_array(np.arange(3, dtype=">i4"))
    wire = encode_tensor(array)
    assert wire["dtype"] == "int32"
    assert bytes(wire["data"]) == np.arange(3, dtype="<i4").tobytes()


def test_bf16_bits_to_float32_matches_torch_for_every_bit_pattern() -> None:
    bits = np.arange(2**16, dtype=np.uint16)
    ours = bf16_bits_to_float32(bits)
    theirs = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    assert ours.dtype == np.float32
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


@FAST
@given(hnp.arrays(np.uint16, SHAPES))
def test_bf16_bits_to_float32_keeps_shape(bits: np.ndarray[Any, Any]) -> None:
    widened = bf16_bits_to_float32(bits)
    assert widened.shape == bits.shape
    assert np.array_equal(widened.view(np.uint32) >> 16, bits.astype(np.uint32))
