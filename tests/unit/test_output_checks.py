"""What a model must return, and how big one forward may get: the output
check after each forward, the warm-up refusal at load (real TorchScript
files), the config loader's refusal of a variable output axis with nothing to
cut it back to, and ``max_batch_bytes`` (the padded-size computation, the
check of one request, the client refusing before anything is enqueued)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import fakeredis
import numpy as np
import pytest
import torch
from torch import Tensor, nn

from common.errors import ConfigError, InvalidInput
from common.keys import Keys
from common.settings import ModelConfig, load_settings
from common.spec import ModelSpec, PaddedSize, TensorSpec, padded_bytes
from producer import AsyncClient
from worker.batching import OutputMismatch, check_output
from worker.executor import Executor
from worker.registry import load_model

KEYS = Keys()

# -- the check of one output against its declaration ---------------------------

FIXED = TensorSpec("y", "float32", (4,))
VARIABLE = TensorSpec("s", "float32", (-1, 2))


@pytest.mark.parametrize(
    ("tensor", "shape", "rows", "longest"),
    [
        (FIXED, (3, 4), 3, 0),
        (VARIABLE, (2, 5, 2), 2, 5),
        (VARIABLE, (2, 9, 2), 2, 5),  # longer is fine: cut back per request
    ],
)
def test_outputs_that_fit_pass(
    tensor: TensorSpec, shape: tuple[int, ...], rows: int, longest: int
) -> None:
    check_output("m", tensor, shape, rows, longest)


@pytest.mark.parametrize(
    ("tensor", "shape", "rows", "longest", "message"),
    [
        (FIXED, (1, 4), 8, 0, "got shape [1, 4], declared [n, 4] with n = 8 (the batch's rows)"),
        (FIXED, (0, 4), 1, 0, "got shape [0, 4], declared [n, 4] with n = 1 (the batch's rows)"),
        (FIXED, (2, 8), 2, 0, "got shape [2, 8], declared [n, 4] with n = 2 (the batch's rows)"),
        (FIXED, (2,), 2, 0, "got shape [2], declared [n, 4] with n = 2 (the batch's rows)"),
        (FIXED, (2, 4, 1), 2, 0, "got shape [2, 4, 1], declared [n, 4]"),
        (
            VARIABLE,
            (2, 4, 2),
            2,
            5,
            "got shape [2, 4, 2], declared [n, -1, 2] with n = 2 (the batch's rows), "
            "each -1 at least 5 (the longest request)",
        ),
        (VARIABLE, (2, 5, 3), 2, 5, "got shape [2, 5, 3], declared [n, -1, 2]"),
    ],
)
def test_outputs_that_break_their_declaration_are_named(
    tensor: TensorSpec, shape: tuple[int, ...], rows: int, longest: int, message: str
) -> None:
    with pytest.raises(OutputMismatch) as info:
        check_output("m", tensor, shape, rows, longest)
    assert str(info.value).startswith(f"model 'm' output {tensor.name!r}: {message}")


# -- refused at load: the warm-up forward, on real TorchScript files -------------


class FirstRow(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x[:1]


class NoRows(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x[:0]


class Wide(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, x], dim=1)


class Empty(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x[:, :0]


class Twice(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * 2


def scripted(tmp_path: Path, module: nn.Module, *, shape: tuple[int, ...] = (4,)) -> ModelConfig:
    path = tmp_path / f"{type(module).__name__}.pt"
    torch.jit.script(module).save(str(path))  # type: ignore[no-untyped-call]
    return ModelConfig(
        "m", path,
        inputs=(TensorSpec("x", "float32", shape),), outputs=(TensorSpec("y", "float32", shape),),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("module", "shape", "got", "declared"),
    [
        (Wide(), (4,), "[1, 8]", "[n, 4]"),
        (NoRows(), (4,), "[0, 4]", "[n, 4]"),
        (Empty(), (-1,), "[1, 0]", "[n, -1]"),
    ],
    ids=["8-columns-for-4", "no-rows", "variable-axis-cut-to-nothing"],
)
def test_a_model_breaking_its_declared_outputs_at_warm_up_is_refused(
    tmp_path: Path, module: nn.Module, shape: tuple[int, ...], got: str, declared: str
) -> None:
    config = scripted(tmp_path, module, shape=shape)
    with pytest.raises(ConfigError) as info:
        load_model(config, "cpu", Executor("cpu").warm_up)
    message = str(info.value)
    assert message.startswith(f"model 'm' output 'y': got shape {got}, declared {declared}")
    assert "on a warm-up request of one row" in message
    assert message.endswith(
        f"fix the model's forward or the output's shape in its [[models.outputs]] entry "
        f"({config.path})"
    )


def test_models_that_keep_their_declaration_at_warm_up_load(tmp_path: Path) -> None:
    executor = Executor("cpu")
    assert load_model(scripted(tmp_path, Twice()), "cpu", executor.warm_up).name == "m"
    assert load_model(scripted(tmp_path, Twice(), shape=(-1,)), "cpu", executor.warm_up)
    # x[:1] is right for one row (the warm-up): refused per batch instead
    # (tests/unit/test_worker_parts.py, tests/integration/test_model_contract.py)
    assert load_model(scripted(tmp_path, FirstRow()), "cpu", executor.warm_up)


# -- refused by the config loader ---------------------------------------------------


def test_a_variable_output_axis_needs_a_variable_input_axis(tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text(
        '[[models]]\nname = "pad"\npath = "pad.pt"\n'
        '  [[models.inputs]]\n  name = "x"\n  dtype = "float32"\n  shape = [4]\n'
        '  [[models.outputs]]\n  name = "y"\n  dtype = "float32"\n  shape = [-1]\n'
    )
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={})
    assert str(info.value) == (
        "model 'pad': output 'y' declares a variable axis (shape [-1]) but no input has one, "
        "so there is no request length to cut it back to: declare its fixed size instead of -1"
    )


def test_a_variable_output_axis_with_a_variable_input_axis_loads(tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text(
        '[[models]]\nname = "seq"\npath = "seq.pt"\n'
        '  [[models.inputs]]\n  name = "x"\n  dtype = "int64"\n  shape = [-1]\n'
        '  [[models.outputs]]\n  name = "y"\n  dtype = "float32"\n  shape = [-1, 3]\n'
    )
    assert load_settings(config, env={}).model("seq").outputs[0].shape == (-1, 3)


# -- max_batch_bytes: the padded size, one request, the client ----------------------

SEQ = ModelSpec(
    "seq",
    inputs=(TensorSpec("tokens", "int64", (-1,)), TensorSpec("w", "float16", (-1, 2))),
    outputs=(TensorSpec("y", "float32", (4,)),),
    max_batch_size=8,
    extra={"max_batch_bytes": 1000},
)


def seq(rows: int, length: int, width: int) -> dict[str, np.ndarray]:  # type: ignore[type-arg]
    return {
        "tokens": np.ones((rows, length), np.int64),
        "w": np.ones((rows, width, 2), np.float16),
    }


def test_padded_size_is_rows_times_the_longest_row_per_input() -> None:
    a, b = seq(2, 3, 5), seq(1, 7, 1)
    assert padded_bytes(SEQ, [a]) == 2 * 3 * 8 + 2 * 5 * 2 * 2
    # padded: tokens to 7, w to 5 x 2
    assert padded_bytes(SEQ, [a, b]) == 3 * 7 * 8 + 3 * 5 * 2 * 2
    grown = PaddedSize(SEQ).join(a).join(b)
    assert (grown.rows, grown.nbytes) == (3, padded_bytes(SEQ, [a, b]))


def test_a_request_over_max_batch_bytes_is_invalid_input() -> None:
    assert SEQ.check_inputs(seq(2, 10, 10), request_id="ok") == 2  # 160 + 80 bytes
    with pytest.raises(InvalidInput) as info:
        SEQ.check_inputs(seq(8, 10, 20), request_id="big")  # 8 x (10 x 8 + 20 x 2 x 2)
    error = info.value
    assert (error.code, error.request_id) == ("invalid_input", "big")
    assert error.message == (
        "inputs take 1280 bytes, over model 'seq' max_batch_bytes 1000 (the most one "
        "forward's inputs may take): send fewer rows or shorter inputs"
    )


def test_a_spec_without_a_published_limit_checks_no_size() -> None:
    unlimited = ModelSpec("seq", SEQ.inputs, SEQ.outputs, max_batch_size=8)
    assert unlimited.max_batch_bytes is None
    assert unlimited.check_inputs(seq(8, 1000, 10)) == 8
    assert ModelSpec.from_json(SEQ.to_json()).max_batch_bytes == 1000


@pytest.fixture
async def client() -> AsyncIterator[tuple[AsyncClient, fakeredis.FakeAsyncRedis]]:
    server = fakeredis.FakeAsyncRedis()
    await server.hset(KEYS.models, "seq", SEQ.to_json())
    async with AsyncClient("redis://fake", redis=server) as c:
        yield c, server
    await server.aclose()


async def test_the_client_refuses_a_request_over_max_batch_bytes(
    client: tuple[AsyncClient, fakeredis.FakeAsyncRedis],
) -> None:
    c, server = client
    with pytest.raises(InvalidInput) as info:
        await c.submit("seq", seq(8, 10, 20), request_id="big")
    assert (info.value.code, info.value.request_id) == ("invalid_input", "big")
    assert "inputs take 1280 bytes, over model 'seq' max_batch_bytes 1000" in info.value.message
    assert await server.exists(KEYS.queue("seq")) == 0  # nothing enqueued
