"""Fast unit tests of the producer's own logic on fakeredis: model lookup,
validation before anything is enqueued, cancellation records, reading a
result by id, and how result statuses map to typed errors."""

from __future__ import annotations

import fakeredis
import numpy as np
import pytest
import torch

from common.envelope import Result, pack_result
from common.errors import (
    InferenceError,
    InvalidInput,
    RequestTimeout,
    UnknownModel,
    UnknownRequest,
)
from common.keys import Keys
from common.spec import ModelSpec, TensorSpec
from producer import AsyncClient, outputs_of

KEYS = Keys()
SPEC = ModelSpec(
    "toy",
    inputs=(TensorSpec("x", "float32", (4,)), TensorSpec("t", "bfloat16", (-1,))),
    outputs=(TensorSpec("y", "bfloat16", (2,)),),
    max_batch_size=8,
)


async def test_models_are_read_from_the_registry(client: AsyncClient) -> None:
    assert await client.models() == {"toy": SPEC}
    assert (await client.spec("toy")).max_batch_size == 8


async def test_unknown_model_is_refused_after_a_fresh_lookup(
    client: AsyncClient, fake: fakeredis.FakeAsyncRedis
) -> None:
    with pytest.raises(UnknownModel, match=r"'late'.*served: toy"):
        await client.spec("late")
    late = ModelSpec("late", SPEC.inputs, SPEC.outputs)
    await fake.hset(KEYS.models, "late", late.to_json())
    assert (await client.spec("late")).name == "late"  # a cache miss re-reads the registry


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({"x": np.zeros((1, 4), np.float64)}, "dtype float64"),
        ({"x": np.zeros((1, 5), np.float32)}, "shape"),
        ({"x": np.zeros((9, 4), np.float32)}, "max_batch_size"),
        ({"x": np.zeros((1, 4), np.float32), "z": np.zeros(1)}, "no input"),
    ],
)
async def test_bad_inputs_raise_before_anything_is_enqueued(
    client: AsyncClient, fake: fakeredis.FakeAsyncRedis, inputs: dict[str, object], match: str
) -> None:
    rows = next(iter(inputs.values())).shape[0]  # type: ignore[attr-defined]
    complete = {"t": torch.zeros((rows, 3), dtype=torch.bfloat16), **inputs}
    with pytest.raises(InvalidInput, match=match):
        await client.submit("toy", complete, request_id="r1")
    assert await fake.exists(KEYS.queue("toy")) == 0


async def test_cancel_records_the_id_and_announces_it(
    client: AsyncClient, fake: fakeredis.FakeAsyncRedis
) -> None:
    pubsub = fake.pubsub()
    await pubsub.subscribe(KEYS.cancel_channel)
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    await client.cancel("r9")
    assert await fake.exists(KEYS.cancelled("r9")) == 1
    assert 0 < await fake.ttl(KEYS.cancelled("r9")) <= 3600
    message = await pubsub.get_message(timeout=1)
    assert message is not None and message["data"] == b"r9"
    await pubsub.aclose()


async def test_a_result_can_be_read_by_any_client(
    client: AsyncClient, fake: fakeredis.FakeAsyncRedis
) -> None:
    bits = np.array([[0x3F80, 0x4000]], np.uint16)  # bfloat16 1.0, 2.0
    await fake.set(
        KEYS.result("r2"), pack_result(Result("r2", "ok", {"y": bits}), {"y": "bfloat16"})
    )
    out = await client.result("r2", timeout=1)
    np.testing.assert_array_equal(out["y"], np.array([[1.0, 2.0]], np.float32))
    with pytest.raises(UnknownRequest, match="r3"):  # neither result nor marker: at once
        await client.result("r3", timeout=30)
    await fake.set(KEYS.accepted("r4"), b"{}")  # accepted, not answered yet
    with pytest.raises(RequestTimeout, match="r4"):
        await client.result("r4", timeout=0.05)


def test_result_statuses_map_to_typed_errors() -> None:
    with pytest.raises(InferenceError) as info:
        outputs_of(Result.failure("a", "error", "model_error", "boom"))
    assert (info.value.code, info.value.request_id) == ("model_error", "a")
    with pytest.raises(InferenceError) as cancelled:
        outputs_of(Result.failure("b", "cancelled", "cancelled", "request cancelled"))
    assert cancelled.value.code == "cancelled"
    with pytest.raises(RequestTimeout):
        outputs_of(Result.failure("c", "expired", "expired", "deadline passed"))


def test_request_ids_are_unique_per_client() -> None:
    a, b = AsyncClient("redis://x"), AsyncClient("redis://x")
    assert a.client_id != b.client_id
    assert Keys("custom").queue("m") == "custom:q:m"
