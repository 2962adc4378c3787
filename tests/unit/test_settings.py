"""Settings loading (common.settings), model signatures (common.spec) and the
Redis key schema (common.keys)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.codec import CodecLimits
from common.errors import ConfigError, InvalidInput
from common.keys import CONSUMER_GROUP, REQUEST_FIELD, Keys
from common.settings import Settings, load_settings
from common.spec import ModelSpec, TensorSpec

MODELS_TOML = """
[[models]]
name = "mlp"
path = "models/mlp.pt"
max_batch_size = 128
max_delay_ms = 2
max_queue_len = 500
  [[models.inputs]]
  name = "x"
  dtype = "float32"
  shape = [256]
  [[models.outputs]]
  name = "y"
  dtype = "float32"
  shape = [10]

[[models]]
name = "tagger"
path = "/abs/tagger.pt"
  [[models.inputs]]
  name = "tokens"
  dtype = "int64"
  shape = [-1]
  pad_value = 0
  [[models.inputs]]
  name = "mask"
  dtype = "bool"
  shape = [-1]
  [[models.outputs]]
  name = "tags"
  dtype = "bfloat16"
  shape = [-1, 8]
"""


TENSORS = (
    "[[models.inputs]]\nname = 'x'\ndtype = 'float32'\nshape = [2]\n"
    "[[models.outputs]]\nname = 'y'\ndtype = 'float32'\nshape = [2]\n"
)


def write(directory: Path, text: str, name: str = "tensorq.toml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- precedence


def test_defaults_without_file_or_env() -> None:
    settings = load_settings(env={})
    assert settings == Settings()
    assert settings.redis.url == ""
    assert settings.redis.prefix == "tq"
    assert settings.redis.result_ttl_s == 3600
    assert settings.models == ()
    assert settings.config_path is None


def test_file_then_env_then_overrides(tmp_path: Path) -> None:
    config = write(tmp_path, '[redis]\nurl = "redis://file:6379"\nprefix = "file"\n')
    assert load_settings(config, env={}).redis.url == "redis://file:6379"

    env = {"TQ_REDIS_URL": "redis://env:6379"}
    from_env = load_settings(config, env=env)
    assert from_env.redis.url == "redis://env:6379"
    assert from_env.redis.prefix == "file"  # untouched keys keep the file's value

    overridden = load_settings(config, env=env, overrides={"redis.url": "redis://flag:6379"})
    assert overridden.redis.url == "redis://flag:6379"
    assert overridden.redis.prefix == "file"


def test_none_overrides_are_skipped(tmp_path: Path) -> None:
    config = write(tmp_path, "[worker]\nblock_ms = 100\n")
    settings = load_settings(
        config,
        env={"TQ_WORKER_BLOCK_MS": "200"},
        overrides={"worker.block_ms": None, "redis.url": None},
    )
    assert settings.worker.block_ms == 200
    assert settings.redis.url == ""


def test_env_applies_without_a_file() -> None:
    settings = load_settings(env={"TQ_WORKER_DEVICES": "cpu*2", "TQ_REDIS_PREFIX": "x"})
    assert settings.worker.devices == "cpu*2"
    assert settings.redis.prefix == "x"


def test_unrelated_env_is_ignored() -> None:
    settings = load_settings(env={"TQ_NOT_A_SETTING": "1", "REDIS_URL": "redis://elsewhere"})
    assert settings == Settings()


def test_tq_config_env_names_the_file(tmp_path: Path) -> None:
    config = write(tmp_path, '[redis]\nurl = "redis://from-tq-config"\n')
    settings = load_settings(env={"TQ_CONFIG": str(config)})
    assert settings.redis.url == "redis://from-tq-config"
    assert settings.config_path == config


def test_explicit_config_wins_over_tq_config(tmp_path: Path) -> None:
    first = write(tmp_path, '[redis]\nurl = "redis://a"\n', "a.toml")
    second = write(tmp_path, '[redis]\nurl = "redis://b"\n', "b.toml")
    assert load_settings(first, env={"TQ_CONFIG": str(second)}).redis.url == "redis://a"


# --------------------------------------------------------------------------- coercion


def test_env_strings_are_coerced_to_field_types() -> None:
    settings = load_settings(
        env={
            "TQ_WORKER_BLOCK_MS": "250",
            "TQ_WORKER_DRAIN_GRACE_S": "2.5",
            "TQ_REDIS_SOCKET_TIMEOUT_S": "3",
            "TQ_REDIS_MAX_CONNECTIONS": "8",
            "TQ_LIMITS_MAX_DIMS": "4",
            "TQ_LIMITS_MAX_PAYLOAD_BYTES": "1024",
        }
    )
    assert settings.worker.block_ms == 250
    assert type(settings.worker.block_ms) is int
    assert settings.worker.drain_grace_s == 2.5
    assert settings.redis.socket_timeout_s == 3.0
    assert type(settings.redis.socket_timeout_s) is float
    assert settings.redis.max_connections == 8
    assert settings.limits.codec() == CodecLimits(max_payload_bytes=1024, max_dims=4)


def test_file_ints_widen_to_float_fields(tmp_path: Path) -> None:
    config = write(tmp_path, "[redis]\nconnect_timeout_s = 2\n")
    value = load_settings(config, env={}).redis.connect_timeout_s
    assert value == 2.0
    assert type(value) is float


def test_override_strings_are_coerced() -> None:
    settings = load_settings(env={}, overrides={"worker.max_deliveries": "7"})
    assert settings.worker.max_deliveries == 7


@pytest.mark.parametrize(
    "env",
    [
        {"TQ_WORKER_BLOCK_MS": "fast"},
        {"TQ_WORKER_BLOCK_MS": "1.5"},
        {"TQ_REDIS_SOCKET_TIMEOUT_S": "soon"},
        {"TQ_LIMITS_MAX_DIMS": ""},
    ],
)
def test_bad_env_values_are_config_errors(env: dict[str, str]) -> None:
    name = next(iter(env))
    with pytest.raises(ConfigError, match=name):
        load_settings(env=env)


@pytest.mark.parametrize(
    "text",
    [
        "[worker]\nblock_ms = 1.5\n",
        "[worker]\nblock_ms = true\n",
        '[worker]\nblock_ms = "lots"\n',
        "[worker]\nblock_ms = [1]\n",
        "[redis]\nsocket_timeout_s = true\n",
        "[redis]\nurl = 6379\n",
    ],
)
def test_bad_file_values_are_config_errors(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError):
        load_settings(write(tmp_path, text), env={})


def test_bad_override_values_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        load_settings(env={}, overrides={"worker.block_ms": "soon"})
    with pytest.raises(ConfigError):
        load_settings(env={}, overrides={"worker.block_ms": 2.5})


# --------------------------------------------------------------------------- bad files


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[redsi]\nurl = "x"\n', "redsi"),
        ("[gatewya]\nport = 80\n", "gatewya"),
        ('[redis]\nurll = "x"\n', "urll"),
        ("[worker]\nblock_msec = 5\n", "block_msec"),
        ("redis = 5\n", "redis"),
        ("models = 5\n", "models"),
        ("models = [1]\n", "models"),
        ("[[models]]\nname = 'm'\n", "path"),
        ("[[models]]\npath = 'm.pt'\n", "name"),
        ("[[models]]\nname = 'm'\npath = 'm.pt'\nmax_batch = 3\n", "max_batch"),
        (
            "[[models]]\nname = 'm'\npath = 'm.pt'\n[[models.inputs]]\n"
            "name = 'x'\ndtype = 'float32'\nshape = [2]\nshpe = [3]\n",
            "shpe",
        ),
        (
            "[[models]]\nname = 'm'\npath = 'm.pt'\n[[models.inputs]]\n"
            "name = 'x'\ndtype = 'float99'\nshape = [2]\n",
            "float99",
        ),
        (
            "[[models]]\nname = 'm'\npath = 'm.pt'\n[[models.inputs]]\n"
            "name = 'x'\ndtype = 'float32'\nshape = [0]\n",
            "shape",
        ),
        (
            "[[models]]\nname = 'm'\npath = 'm.pt'\n[[models.inputs]]\n"
            "name = 'x'\ndtype = 'float32'\nshape = [-1]\npad_value = 'zero'\n",
            "pad_value",
        ),
        ("[[models]]\nname = 'm'\npath = 'm.pt'\nmax_batch_size = 'many'\n", "many"),
        (
            "[[models]]\nname = 'm'\npath = 'a.pt'\n"
            + TENSORS
            + "[[models]]\nname = 'm'\npath = 'b.pt'\n"
            + TENSORS,
            "unique",
        ),
        ("[redis\n", "tensorq.toml"),
    ],
)
def test_bad_files_are_config_errors(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings(write(tmp_path, text), env={})


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})


# --------------------------------------------------------------------------- models


def test_models_are_parsed(tmp_path: Path) -> None:
    config = write(tmp_path, MODELS_TOML)
    settings = load_settings(config, env={})
    assert [m.name for m in settings.models] == ["mlp", "tagger"]
    mlp = settings.model("mlp")
    assert mlp.inputs == (TensorSpec("x", "float32", (256,)),)
    assert mlp.outputs == (TensorSpec("y", "float32", (10,)),)
    assert (mlp.max_batch_size, mlp.max_delay_ms, mlp.max_queue_len) == (128, 2.0, 500)
    tagger = settings.model("tagger")
    assert tagger.max_batch_size == 64  # defaults
    assert tagger.max_queue_len == 100_000
    assert tagger.inputs[0].variable_axes == (0,)
    assert tagger.outputs[0].shape == (-1, 8)
    with pytest.raises(ConfigError, match="nope"):
        settings.model("nope")


def test_model_paths_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path / "etc" / "tq", MODELS_TOML)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(config, env={})
    assert settings.model("mlp").path == tmp_path / "etc" / "tq" / "models" / "mlp.pt"
    assert settings.model("tagger").path == Path("/abs/tagger.pt")
    assert settings.config_path == config


def test_model_config_spec_carries_queue_settings(tmp_path: Path) -> None:
    mlp = load_settings(write(tmp_path, MODELS_TOML), env={}).model("mlp")
    spec = mlp.spec("v3")
    assert spec.name == "mlp"
    assert spec.max_batch_size == 128
    assert spec.version == "v3"
    assert dict(spec.extra) == {
        "max_queue_len": 500,
        "max_delay_ms": 2.0,
        "max_batch_bytes": 256 * 1024 * 1024,
    }


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MODELS_TOML), env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.redis = None  # type: ignore[misc,assignment]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.worker.block_ms = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.models[0].max_batch_size = 1  # type: ignore[misc]
    assert isinstance(settings.models, tuple)
    changed = settings.replace(config_path=None)
    assert changed.config_path is None
    assert settings.config_path is not None


# --------------------------------------------------------------------------- ModelSpec


def make_spec(max_batch_size: int = 4) -> ModelSpec:
    return ModelSpec(
        name="tagger",
        inputs=(
            TensorSpec("tokens", "int64", (-1,), pad_value=0),
            TensorSpec("feats", "float32", (-1, 3), pad_value=-1.5),
            TensorSpec("h", "bfloat16", (2,)),
        ),
        outputs=(TensorSpec("tags", "float32", (-1, 5)),),
        max_batch_size=max_batch_size,
        version="abc123",
        extra={"max_queue_len": 100, "max_delay_ms": 2.0},
    )


def good_inputs(rows: int = 2, length: int = 7) -> dict[str, np.ndarray[Any, Any]]:
    return {
        "tokens": np.zeros((rows, length), np.int64),
        "feats": np.zeros((rows, length, 3), np.float32),
        "h": np.zeros((rows, 2), np.uint16),
    }


def test_model_spec_json_round_trip() -> None:
    spec = make_spec()
    text = spec.to_json()
    back = ModelSpec.from_json(text)
    assert back == spec
    assert dict(back.extra) == dict(spec.extra)
    assert ModelSpec.from_json(text.encode()) == spec
    raw = json.loads(text)
    assert set(raw) == {"name", "inputs", "outputs", "max_batch_size", "version", "extra"}
    assert raw["inputs"][1] == {
        "name": "feats",
        "dtype": "float32",
        "shape": [-1, 3],
        "pad_value": -1.5,
    }
    assert raw["extra"] == {"max_queue_len": 100, "max_delay_ms": 2.0}


def test_model_spec_validates_itself() -> None:
    x = TensorSpec("x", "float32", (2,))
    with pytest.raises(ConfigError):
        ModelSpec("m", (), (x,))
    with pytest.raises(ConfigError):
        ModelSpec("m", (x,), ())
    with pytest.raises(ConfigError):
        ModelSpec("m", (x,), (x,), max_batch_size=0)
    with pytest.raises(ConfigError):
        TensorSpec("x", "uint16", (2,))
    with pytest.raises(ConfigError):
        TensorSpec("x", "float32", (-2,))


@pytest.mark.parametrize(("rows", "length"), [(1, 1), (2, 7), (4, 300)])
def test_check_inputs_accepts_and_returns_rows(rows: int, length: int) -> None:
    assert make_spec().check_inputs(good_inputs(rows, length)) == rows


def test_check_inputs_error_carries_request_id() -> None:
    inputs = good_inputs()
    del inputs["h"]
    with pytest.raises(InvalidInput) as info:
        make_spec().check_inputs(inputs, request_id="r-77")
    assert info.value.request_id == "r-77"
    assert info.value.code == "invalid_input"


def _with(**changes: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = good_inputs()
    for name, value in changes.items():
        if value is None:
            del inputs[name]
        else:
            inputs[name] = value
    return inputs


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        (_with(extra=np.zeros((2, 1), np.float32)), "extra"),
        (_with(tokens=None), "missing input 'tokens'"),
        (_with(tokens=np.zeros((2, 7), np.int32)), "dtype int32"),
        (_with(h=np.zeros((2, 2), np.float32)), "model wants bfloat16"),
        (_with(h=np.zeros((2, 3), np.uint16)), "shape"),
        (_with(h=np.zeros((2,), np.uint16)), "shape"),
        (_with(h=np.zeros((2, 2, 1), np.uint16)), "shape"),
        (_with(feats=np.zeros((2, 7, 4), np.float32)), "shape"),
        (_with(tokens=np.zeros((2, 0), np.int64)), "shape"),
        (_with(tokens=np.zeros((3, 7), np.int64)), "disagree"),
    ],
)
def test_check_inputs_refuses(inputs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        make_spec().check_inputs(inputs)


def test_variable_axes_accept_different_lengths_per_input() -> None:
    # each -1 axis accepts any length >= 1, independently per input
    inputs = good_inputs(2, 7)
    inputs["feats"] = np.zeros((2, 3, 3), np.float32)
    assert make_spec().check_inputs(inputs) == 2


def test_zero_rows_are_refused() -> None:
    with pytest.raises(InvalidInput, match="at least one row"):
        make_spec().check_inputs(good_inputs(0))


def test_rows_over_max_batch_size_are_refused() -> None:
    assert make_spec(max_batch_size=4).check_inputs(good_inputs(4)) == 4
    with pytest.raises(InvalidInput, match="max_batch_size"):
        make_spec(max_batch_size=4).check_inputs(good_inputs(5))


# --------------------------------------------------------------------------- Keys


def test_default_key_names() -> None:
    keys = Keys()
    assert keys.prefix == "tq"
    assert keys.queue("mlp") == "tq:q:mlp"
    assert keys.result("r-1") == "tq:r:r-1"
    assert keys.inbox("client-9") == "tq:inbox:client-9"
    assert keys.dead("mlp") == "tq:dead:mlp"
    assert keys.cancelled("r-1") == "tq:cancel:r-1"
    assert keys.workers == "tq:workers"
    assert keys.models == "tq:models"
    assert CONSUMER_GROUP == "workers"
    assert REQUEST_FIELD == "req"


def test_custom_prefix_key_names() -> None:
    keys = Keys("staging")
    assert keys.queue("mlp") == "staging:q:mlp"
    assert keys.result("r-1") == "staging:r:r-1"
    assert keys.inbox("c") == "staging:inbox:c"
    assert keys.dead("mlp") == "staging:dead:mlp"
    assert keys.cancelled("r-1") == "staging:cancel:r-1"
    assert keys.workers == "staging:workers"
    assert keys.models == "staging:models"


def test_keys_follow_the_settings_prefix() -> None:
    settings = load_settings(env={"TQ_REDIS_PREFIX": "p1"})
    assert Keys.of(settings.redis).queue("m") == "p1:q:m"
