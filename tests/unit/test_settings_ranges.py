"""Every setting is checked for type and range where settings are built: a
bad value is one ConfigError line naming the setting, where the value came
from and what is allowed; through the CLI that is ``tensorq <verb>: <line>``
and exit 2, before anything starts. Also: the database number of a Redis
URL, which scopes the control channels (common/keys.py)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import ConfigError
from common.keys import Keys
from common.settings import (
    GatewaySettings,
    RedisSettings,
    Settings,
    WorkerSettings,
    apply_flags,
    load_settings,
)
from tests.conftest import ROOT


def refusal(**kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- sections

# (variable, value, the setting as named, what is allowed) -- the cases first
ENV_CASES = [
    ("TQ_REDIS_RESULT_TTL_S", "0", "[redis] result_ttl_s", "an integer >= 1"),
    (
        "TQ_REDIS_COLLECTED_RESULT_TTL_S",
        "-1",
        "[redis] collected_result_ttl_s",
        "an integer >= 0",
    ),
    ("TQ_WORKER_BLOCK_MS", "-5", "[worker] block_ms", "an integer from 1 to 60000"),
    ("TQ_WORKER_CLAIM_IDLE_MS", "-1", "[worker] claim_idle_ms", "an integer >= 100"),
    ("TQ_WORKER_BATCH_POLICY", "bogus", "[worker] batch_policy", "one of '', 'fixed', 'adaptive'"),
    ("TQ_WORKER_DRAIN_GRACE_S", "-1", "[worker] drain_grace_s", "a number >= 0"),
    ("TQ_WORKER_HEARTBEAT_S", "0", "[worker] heartbeat_s", "a number > 0 and <= 2.5"),
    ("TQ_WORKER_MAX_DELIVERIES", "0", "[worker] max_deliveries", "an integer >= 1"),
    ("TQ_LIMITS_MAX_DIMS", "0", "[limits] max_dims", "an integer from 1 to 32"),
    ("TQ_WORKER_THREADS", "-2", "[worker] threads", "an integer from 0 to 1024"),
    ("TQ_WORKER_BLOCK_MS", "1.5", "[worker] block_ms", "an integer from 1 to 60000"),
    ("TQ_WORKER_WATCH_MODELS", "maybe", "[worker] watch_models", "true or false"),
    ("TQ_WORKER_DEVICES", "gpu0", "[worker] devices", "auto, or a comma-separated list"),
    ("TQ_WORKER_METRICS_PORT", "70000", "[worker] metrics_port", "an integer from 0 to 65535"),
    ("TQ_REDIS_SOCKET_TIMEOUT_S", "nan", "[redis] socket_timeout_s", "a number > 0"),
    ("TQ_REDIS_CONNECT_TIMEOUT_S", "0", "[redis] connect_timeout_s", "a number > 0"),
    ("TQ_REDIS_MAX_CONNECTIONS", "0", "[redis] max_connections", "an integer from 1 to"),
    ("TQ_REDIS_PREFIX", "a{b}", "[redis] prefix", "1 to 64 characters"),
    ("TQ_LIMITS_MAX_PAYLOAD_BYTES", "0", "[limits] max_payload_bytes", "an integer >= 1"),
    ("TQ_GATEWAY_PORT", "-1", "[gateway] port", "an integer from 0 to 65535"),
    ("TQ_GATEWAY_SYNC_TIMEOUT_S", "0", "[gateway] sync_timeout_s", "a number > 0"),
    ("TQ_GATEWAY_POLL_INTERVAL_MS", "0", "[gateway] poll_interval_ms", "an integer >= 1"),
    ("TQ_GATEWAY_SPEC_REFRESH_S", "-1", "[gateway] spec_refresh_s", "a number > 0"),
    ("TQ_GATEWAY_HOST", "", "[gateway] host", "a host name or address"),
]


@pytest.mark.parametrize(("variable", "value", "name", "allowed"), ENV_CASES)
def test_an_env_value_out_of_range_names_setting_source_and_range(
    variable: str, value: str, name: str, allowed: str
) -> None:
    message = refusal(env={variable: value})
    assert message.startswith(f"{name} = {value!r} (from {variable}): must be {allowed}")


def test_a_file_value_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text("[worker]\nblock_ms = -5\n")
    message = refusal(config=config, env={})
    assert message == f"[worker] block_ms = -5 (from {config}): must be an integer from 1 to 60000"


@pytest.mark.parametrize(
    "text",
    ['[worker]\nmax_deliveries = "4"\n', "[worker]\nheartbeat_s = true\n", "[redis]\nurl = 5\n"],
)
def test_file_values_must_have_their_toml_type(tmp_path: Path, text: str) -> None:
    config = tmp_path / "t.toml"
    config.write_text(text)
    assert f"(from {config}): must be" in refusal(config=config, env={})


def test_a_flag_names_the_flag() -> None:
    message = refusal(env={}, overrides={"worker.block_ms": "0"})
    assert message == (
        "[worker] block_ms = '0' (from the command line): must be an integer from 1 to 60000"
    )
    with pytest.raises(ConfigError, match=r"devices = 'bogus' \(from --devices\)"):
        apply_flags(Settings(), {"worker.devices": ("--devices", "bogus")})
    devices = apply_flags(Settings(), {"worker.devices": ("--devices", "cpu*2, cuda:1")})
    assert devices.worker.devices == "cpu*2, cuda:1"
    assert apply_flags(Settings(), {"worker.devices": ("--devices", None)}) == Settings()


def test_tokens_are_checked_and_never_shown() -> None:
    message = refusal(env={"TQ_GATEWAY_TOKENS": "good,has space"})
    assert message.startswith("[gateway] tokens = <hidden> (from TQ_GATEWAY_TOKENS)")
    assert "space" not in message and "good" not in message
    tokens = load_settings(env={"TQ_GATEWAY_TOKENS": "abc-1, d.e_f~g+/=="}).gateway.tokens
    assert tokens == ("abc-1", "d.e_f~g+/==")


def test_settings_built_in_code_are_checked_too() -> None:
    """A flag applied with dataclasses.replace, or a test's own settings."""
    with pytest.raises(ConfigError, match=r"\[worker\] block_ms = 0: must be an integer from 1"):
        WorkerSettings(block_ms=0)
    with pytest.raises(ConfigError, match=r"\[gateway\] port = 70000"):
        dataclasses.replace(GatewaySettings(), port=70000)
    with pytest.raises(ConfigError, match="result_ttl_s"):
        RedisSettings(result_ttl_s=0)


def test_good_values_at_the_edges_are_accepted() -> None:
    settings = load_settings(
        env={
            "TQ_WORKER_BLOCK_MS": "1",
            "TQ_WORKER_HEARTBEAT_S": "2.5",
            "TQ_WORKER_DRAIN_GRACE_S": "0",
            "TQ_WORKER_WATCH_MODELS": "off",
            "TQ_WORKER_DEVICES": "CUDA:0,cuda:1",
            "TQ_GATEWAY_PORT": "0",
            "TQ_LIMITS_MAX_DIMS": "32",
        }
    )
    assert (settings.worker.block_ms, settings.worker.heartbeat_s) == (1, 2.5)
    assert settings.worker.watch_models is False
    assert settings.limits.max_dims == 32


# --------------------------------------------------------------------------- models

TENSOR = "[[models.{kind}]]\nname = '{name}'\ndtype = 'float32'\nshape = [4]\n"


def model_toml(
    *,
    name: str = "m",
    extra: str = "",
    inputs: tuple[str, ...] = ("x",),
    outputs: tuple[str, ...] = ("y",),
) -> str:
    text = f"[[models]]\nname = {name!r}\npath = 'm.pt'\n{extra}"
    text += "".join(TENSOR.format(kind="inputs", name=n) for n in inputs)
    return text + "".join(TENSOR.format(kind="outputs", name=n) for n in outputs)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (model_toml(name="a b/c"), "[[models]] name = 'a b/c' (from {config}): must be 1 to 64 "
                                   "characters from A-Z a-z 0-9 _ . -"),
        (model_toml(name="x" * 65), "[[models]] name = 'xxxx"),
        (model_toml(extra="max_batch_size = '4'\n"),
         "[[models]] 'm' max_batch_size = '4' (from {config}): must be an integer >= 1"),
        (model_toml(extra="max_batch_size = 0\n"), "[[models]] 'm' max_batch_size = 0"),
        (model_toml(extra="max_batch_bytes = 0\n"),
         "[[models]] 'm' max_batch_bytes = 0 (from {config}): must be an integer >= 1"),
        (model_toml(extra="max_delay_ms = -1\n"),
         "[[models]] 'm' max_delay_ms = -1 (from {config}): must be a number from 0 to 60000"),
        (model_toml(extra="max_queue_len = 0\n"), "[[models]] 'm' max_queue_len = 0"),
        (model_toml(extra="batch_policy = 'bogus'\n"),
         "[[models]] 'm' batch_policy = 'bogus' (from {config}): must be one of 'fixed', "
         "'adaptive'"),
        (model_toml(inputs=("x", "x")), "[[models]] 'm' inputs (from {config}): names must be "
                                        "unique, ['x'] given twice"),
        (model_toml(outputs=("y", "z", "y")), "names must be unique, ['y'] given twice"),
        (model_toml(inputs=()), "[[models]] 'm' declares no inputs"),
        (model_toml(outputs=()), "[[models]] 'm' declares no outputs"),
        (model_toml().replace("shape = [4]", "shape = ['4']", 1),
         "[[models]] 'm' input 'x' shape = ['4'] (from {config}): must be a list of ints"),
        (model_toml().replace("shape = [4]", "shape = [true]", 1), "input 'x' shape = [True]"),
        (model_toml().replace("shape = [4]", "shape = [1, 1, 1, 1, 1, 1, 1, 1]", 1),
         "must have at most 7 dims (with the batch axis, [limits] max_dims 8)"),
        (model_toml().replace("shape = [4]", "shape = [4]\npad_value = true", 1),
         "input 'x' pad_value = True (from {config}): must be a finite number"),
        (model_toml().replace("name = 'x'", "name = 5", 1), "[[models]] 'm' inputs[0] name = 5"),
        (model_toml().replace("path = 'm.pt'", "path = 3"), "[[models]] 'm' path = 3"),
    ],
)  # fmt: skip
def test_model_fields_are_checked(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "t.toml"
    config.write_text(text)
    assert expected.format(config=config) in refusal(config=config, env={})


def test_a_good_model_loads(tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text(model_toml(name="mlp-v2.1_a", extra="max_batch_bytes = 1\n"))
    model = load_settings(config, env={}).model("mlp-v2.1_a")
    assert model.max_batch_bytes == 1
    assert [t.name for t in model.inputs] == ["x"]


def test_no_models_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_settings(env={}).require_models()
    assert "$TQ_CONFIG is not set" in str(info.value)
    assert f"./config/tensorq.toml does not exist in {tmp_path}" in str(info.value)
    empty = tmp_path / "empty.toml"
    empty.write_text("[redis]\n")
    with pytest.raises(ConfigError, match=f"config file {empty} declares no"):
        load_settings(empty, env={}).require_models()


# --------------------------------------------------------------------------- through the CLI


def run_cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TQ_")}
    return subprocess.run(
        [sys.executable, "-m", "common.cli", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
    )  # fmt: skip


def test_cli_refuses_a_bad_env_value_in_one_line(tmp_path: Path) -> None:
    done = run_cli(
        "status", "--redis", "redis://127.0.0.1:1", cwd=tmp_path,
        env={"TQ_REDIS_RESULT_TTL_S": "0"},
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        "tensorq status: [redis] result_ttl_s = '0' (from TQ_REDIS_RESULT_TTL_S): "
        "must be an integer >= 1\n"
    )
    assert done.stdout == ""


def test_cli_refuses_a_bad_model_name_naming_the_file(tmp_path: Path) -> None:
    config = tmp_path / "t.toml"
    config.write_text(model_toml(name="a b/c"))
    done = run_cli("status", "--config", str(config), cwd=tmp_path, env={})
    assert done.returncode == 2
    assert done.stderr.startswith(f"tensorq status: [[models]] name = 'a b/c' (from {config})")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_cli_worker_outside_the_repo_says_which_files_it_looked_for(tmp_path: Path) -> None:
    done = run_cli("worker", "--devices", "cpu", cwd=tmp_path, env={})
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "tensorq worker: no [[models]] configured: no --config given, $TQ_CONFIG is not set "
        f"and ./config/tensorq.toml does not exist in {tmp_path}\n"
    )
    assert "private redis-server" not in done.stdout  # nothing started


def test_cli_worker_names_a_bad_devices_flag(tmp_path: Path) -> None:
    done = run_cli("worker", "--devices", "gpu", cwd=tmp_path, env={})
    assert done.returncode == 2
    assert done.stderr.startswith("tensorq worker: [worker] devices = 'gpu' (from --devices)")


# --------------------------------------------------------------------------- databases


@pytest.mark.parametrize(
    ("url", "db"),
    [
        ("", 0),
        ("redis://h:6379", 0),
        ("redis://h:6379/1", 1),
        ("redis://:pw@h/7", 7),
        ("redis://h/1?db=2", 2),
        ("rediss://h:6380/3", 3),
        ("unix:///tmp/redis.sock", 0),
        ("unix:///tmp/redis.sock?db=4", 4),
        ("redis+cluster://a:1,b:2", 0),
    ],
)
def test_the_database_of_a_url(url: str, db: int) -> None:
    assert RedisSettings(url=url).db == db
    assert Keys.of(RedisSettings(url=url)).db == db


def test_control_channels_are_scoped_to_prefix_and_database() -> None:
    db0 = Keys.of(RedisSettings(url="redis://h/0"))
    db1 = Keys.of(RedisSettings(url="redis://h/1"))
    assert (db0.control_channel, db0.cancel_channel) == ("tq:control:db0", "tq:cancelled:db0")
    assert (db1.control_channel, db1.cancel_channel) == ("tq:control:db1", "tq:cancelled:db1")
    other = Keys.of(RedisSettings(url="redis://h/1", prefix="staging"))
    assert other.control_channel == "staging:control:db1"
    assert Keys().control_channel == "tq:control:db0"
    assert db1.reply("abc") == "tq:reply:abc"
    assert db1.is_reply("tq:reply:abc") and not db1.is_reply("tq:reply:")
    assert not db1.is_reply("tq:inbox:abc") and not other.is_reply("tq:reply:abc")
