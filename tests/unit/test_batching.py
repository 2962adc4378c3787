"""Batch assembly and splitting (pure numpy)."""

from __future__ import annotations

import numpy as np

from common.spec import ModelSpec, TensorSpec
from worker.batching import assemble, split

FIXED = ModelSpec(
    "fixed",
    inputs=(TensorSpec("x", "float32", (3,)), TensorSpec("k", "int64", (2,))),
    outputs=(TensorSpec("y", "float32", (1,)),),
    max_batch_size=16,
)
VARIABLE = ModelSpec(
    "seq",
    inputs=(TensorSpec("tokens", "int64", (-1,), pad_value=7),),
    outputs=(TensorSpec("pooled", "float32", (4,)), TensorSpec("scores", "float32", (-1,))),
    max_batch_size=16,
)


def test_fixed_inputs_concatenate_in_request_order() -> None:
    a = {"x": np.ones((2, 3), np.float32), "k": np.zeros((2, 2), np.int64)}
    b = {"x": np.full((1, 3), 5, np.float32), "k": np.ones((1, 2), np.int64)}
    batch = assemble(FIXED, [a, b])
    assert batch.offsets == (0, 2, 3)
    assert batch.rows == 3
    np.testing.assert_array_equal(batch.inputs[0], np.concatenate([a["x"], b["x"]]))
    np.testing.assert_array_equal(batch.inputs[1], np.concatenate([a["k"], b["k"]]))
    outs = split(FIXED, batch, {"y": np.arange(3, dtype=np.float32)[:, None]})
    np.testing.assert_array_equal(outs[0]["y"], [[0], [1]])
    np.testing.assert_array_equal(outs[1]["y"], [[2]])


def test_variable_axis_is_padded_and_cut_back() -> None:
    short = {"tokens": np.array([[1, 2]], np.int64)}
    long = {"tokens": np.array([[3, 4, 5, 6], [7, 8, 9, 10]], np.int64)}
    batch = assemble(VARIABLE, [short, long])
    assert batch.inputs[0].shape == (3, 4)
    np.testing.assert_array_equal(batch.inputs[0][0], [1, 2, 7, 7])  # declared pad value
    assert batch.lengths == (2, 4)
    scores = np.arange(12, dtype=np.float32).reshape(3, 4)
    pooled = np.zeros((3, 4), np.float32)
    outs = split(VARIABLE, batch, {"pooled": pooled, "scores": scores})
    assert outs[0]["scores"].shape == (1, 2)
    np.testing.assert_array_equal(outs[0]["scores"], [[0, 1]])
    assert outs[1]["scores"].shape == (2, 4)
    assert outs[0]["pooled"].shape == (1, 4)


def test_bfloat16_pad_value_is_written_as_bits() -> None:
    spec = ModelSpec(
        "bf",
        inputs=(TensorSpec("x", "bfloat16", (-1,), pad_value=1.0),),
        outputs=(TensorSpec("y", "bfloat16", (-1,)),),
    )
    one = np.array([[0x3F80]], np.uint16)  # bfloat16 1.0
    batch = assemble(spec, [{"x": np.zeros((1, 1), np.uint16)}, {"x": np.zeros((1, 3), np.uint16)}])
    assert batch.inputs[0][0, 1] == one[0, 0]


def test_allocator_receives_the_batch() -> None:
    seen = []

    def allocate(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:  # type: ignore[type-arg]
        seen.append((shape, dtype))
        return np.empty(shape, dtype)

    batch = assemble(
        FIXED, [{"x": np.ones((2, 3), np.float32), "k": np.ones((2, 2), np.int64)}], allocate
    )
    assert [s for s, _ in seen] == [(2, 3), (2, 2)]
    assert batch.rows == 2
