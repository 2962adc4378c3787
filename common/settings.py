"""Settings: TOML file -> ``TQ_*`` environment -> CLI flags -> one frozen object.

Built once at the edge (the CLI or a test fixture) and passed down; nothing
below reads the environment or a file. Scalar settings live in sections;
the environment variable of ``[worker] block_ms`` is ``TQ_WORKER_BLOCK_MS``
and its override key ``"worker.block_ms"``. Models come from the file only.

Each field declares its allowed values once (``setting(default, Allowed)``);
every value is checked for type and range where settings are built, and a
bad one is one ConfigError line naming the setting, its source (the file,
the variable, the flag) and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from common.codec import CodecLimits
from common.errors import ConfigError
from common.records import LIVE_WITHIN_MS
from common.redis_url import CLUSTER_SCHEMES, check_url
from common.spec import ModelSpec, TensorSpec, check_output_axes

ENV_PREFIX = "TQ_"
CONFIG_ENV = "TQ_CONFIG"
# read when present and neither --config nor $TQ_CONFIG names a file (common/cli.py)
DEFAULT_CONFIG = Path("config/tensorq.toml")


T = TypeVar("T")


# --------------------------------------------------------------------------- allowed values
#
# Every setting declares what it may hold once, beside its field
# (``setting(default, Allowed(...))``), and ``check_value`` checks it in one
# place: where settings are loaded (naming the value's source) and again in
# ``__post_init__`` (a flag applied with ``dataclasses.replace``, a test).


@dataclass(frozen=True)
class Allowed:
    """A setting's allowed values: a number range, a set of choices, or a
    pattern (for each element of a list of strings)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # ``low`` itself is not allowed
    choices: tuple[str, ...] = ()
    pattern: str = ""  # a regular expression the whole string must match
    rule: str = ""  # what the pattern allows, in words

    def allows(self, value: object) -> bool:
        if isinstance(value, bool | str):
            if self.choices and value not in self.choices:
                return False
            return not self.pattern or (
                isinstance(value, str) and re.fullmatch(self.pattern, value) is not None
            )
        if isinstance(value, int | float):
            if not math.isfinite(value):
                return False
            if self.low is not None and (value <= self.low if self.low_open else value < self.low):
                return False
            return self.high is None or value <= self.high
        return True

    def describe(self, kind: str) -> str:
        """``must be ...`` in words, for a field of type ``kind``."""
        if kind == "bool":
            return "true or false"
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if kind == "tuple[str, ...]":
            return f"a list of strings, each {self.rule or 'any text'}"
        if self.rule:
            return self.rule
        if kind == "str":
            return "a string"
        noun = "an integer" if kind == "int" else "a number"
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            if self.low_open:
                return f"{noun} > {low} and <= {high}"
            return f"{noun} from {low} to {high}"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{noun} <= {high}"
        return noun


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:g}" if not float(value).is_integer() else f"{value:.0f}"


def at_least(low: float, high: float | None = None) -> Allowed:
    return Allowed(low=low, high=high)


def above(low: float, high: float | None = None) -> Allowed:
    return Allowed(low=low, high=high, low_open=True)


def one_of(*choices: str) -> Allowed:
    return Allowed(choices=choices)


def matching(pattern: str, rule: str) -> Allowed:
    return Allowed(pattern=pattern, rule=rule)


ALLOWED = "allowed"  # the field metadata key


def setting(default: T, allowed: Allowed, *, repr: bool = True) -> T:
    """A settings field with its allowed values."""
    return field(default=default, metadata={ALLOWED: allowed}, repr=repr)


PORT = at_least(0, 65535)
# Model names and the key prefix go into Redis keys (and hash tags on Cluster).
MODEL_NAME = matching(r"[A-Za-z0-9_.-]{1,64}", "1 to 64 characters from A-Z a-z 0-9 _ . -")
PREFIX = matching(r"[A-Za-z0-9_.:-]{1,64}", "1 to 64 characters from A-Z a-z 0-9 _ . : -")
_DEVICE = r"(?:cuda:\d+|cpu:\d+|cpu(?:\*[1-9]\d*)?)"
DEVICES = matching(
    rf"(?i)\s*(?:auto|{_DEVICE}(?:\s*,\s*{_DEVICE})*)\s*",
    "auto, or a comma-separated list of cuda:N, cpu, cpu*N, cpu:N",
)
# RFC 6750 b64token: what an Authorization: Bearer header can carry.
TOKEN = matching(r"[A-Za-z0-9._~+/-]+=*", "of A-Z a-z 0-9 . _ ~ + / - (then = padding)")
HEARTBEAT_MAX_S = LIVE_WITHIN_MS / 2000  # two heartbeats within the liveness window


def check_value(kind: str, allowed: Allowed | None, value: object) -> bool:
    """Whether ``value`` has the field's type (``kind``: int, float, bool, str,
    tuple[str, ...]) and is allowed."""
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind == "tuple[str, ...]":
        return isinstance(value, tuple) and all(
            isinstance(v, str) and (allowed is None or allowed.allows(v)) for v in value
        )
    else:
        return True
    return ok and (allowed is None or allowed.allows(value))


def refusal(setting_name: str, value: object, source: str, kind: str, allowed: Allowed) -> str:
    """The one line that refuses a setting: its name, value, source and what is allowed."""
    text = "<hidden>" if setting_name.endswith("tokens") else f"{value!r:.80}"  # secrets
    where = f" (from {source})" if source else ""
    return f"{setting_name} = {text}{where}: must be {allowed.describe(kind)}"


def _check_fields(obj: Any, label: str) -> None:
    """Check every field of a settings dataclass against its declaration."""
    for fld in dataclasses.fields(obj):
        allowed = fld.metadata.get(ALLOWED)
        if allowed is None:
            continue
        value = getattr(obj, fld.name)
        if not check_value(str(fld.type), allowed, value):
            raise ConfigError(refusal(f"{label}{fld.name}", value, "", str(fld.type), allowed))


@dataclass(frozen=True)
class RedisSettings:
    url: str = setting("", Allowed())  # empty: a private redis-server is started
    prefix: str = setting("tq", PREFIX)
    socket_timeout_s: float = setting(10.0, above(0, 3600))
    connect_timeout_s: float = setting(5.0, above(0, 3600))
    max_connections: int = setting(64, at_least(1, 100_000))
    result_ttl_s: int = setting(3600, at_least(1))
    # A stored result its submitting client has handed to its caller: shortened
    # to this (0: deleted); a value >= result_ttl_s leaves results as they are.
    collected_result_ttl_s: int = setting(60, at_least(0))
    cluster: bool = setting(False, Allowed())  # also implied by a redis+cluster:// URL

    def __post_init__(self) -> None:
        _check_fields(self, "[redis] ")
        if self.url:
            try:
                check_url(self.url, cluster=self.cluster)
            except ConfigError as exc:
                raise ConfigError(f"[redis] url: {exc}") from None

    def with_url(self, url: str) -> RedisSettings:
        return dataclasses.replace(self, url=url)

    @property
    def is_cluster(self) -> bool:
        """Redis Cluster: every component uses ``redis.asyncio.RedisCluster``."""
        return self.cluster or self.url.split("://", 1)[0] in CLUSTER_SCHEMES

    @property
    def db(self) -> int:
        """The database the URL selects (``redis://h/1``, ``?db=1``), as
        redis-py reads it; 0 without a URL and on Redis Cluster (which has only 0)."""
        if self.is_cluster or not self.url:
            return 0
        from redis.connection import parse_url

        try:
            return int(parse_url(self.url).get("db") or 0)  # type: ignore[no-untyped-call]
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"[redis] url: {exc}") from None


@dataclass(frozen=True)
class LimitSettings:
    max_payload_bytes: int = setting(64 * 1024 * 1024, at_least(1))
    max_dims: int = setting(8, at_least(1, 32))

    def __post_init__(self) -> None:
        _check_fields(self, "[limits] ")

    def codec(self) -> CodecLimits:
        return CodecLimits(self.max_payload_bytes, self.max_dims)


@dataclass(frozen=True)
class WorkerSettings:
    devices: str = setting("auto", DEVICES)  # cuda:0,cuda:1 | cpu | cpu*2 | auto
    # longest XREADGROUP block; also how fast a stop is noticed (0 would block forever)
    block_ms: int = setting(500, at_least(1, 60_000))
    # visibility timeout before another worker reclaims (leases renew every third of it)
    claim_idle_ms: int = setting(30_000, at_least(100))
    max_deliveries: int = setting(3, at_least(1))
    drain_grace_s: float = setting(30.0, at_least(0))
    # a worker counts as live while heard from within LIVE_WITHIN_MS: beat twice in it
    heartbeat_s: float = setting(1.0, above(0, HEARTBEAT_MAX_S))
    threads: int = setting(0, at_least(0, 1024))  # intra-op threads per CPU slot; 0 = cores / slots
    # test-only fault hook: SIGKILL on such request ids
    crash_on_request_prefix: str = setting("", Allowed())
    watch_models: bool = setting(False, Allowed())  # reload a model when its file changes
    # fixed | adaptive for every model; empty = each model's own
    batch_policy: str = setting("", one_of("", "fixed", "adaptive"))
    # >0: the pool serves worker histograms (Prometheus) on this port
    metrics_port: int = setting(0, PORT)

    def __post_init__(self) -> None:
        _check_fields(self, "[worker] ")


@dataclass(frozen=True)
class GatewaySettings:
    """``tensorq gateway``: the HTTP front door (see producer/gateway)."""

    host: str = setting("127.0.0.1", matching(r"\S+", "a host name or address"))
    port: int = setting(8000, PORT)  # 0: any free port
    max_body_bytes: int = setting(64 * 1024 * 1024, at_least(1))  # larger bodies get 413
    # Bearer tokens; empty = no auth. TQ_GATEWAY_TOKENS is comma separated.
    tokens: tuple[str, ...] = setting((), TOKEN, repr=False)
    # POST /v2/models/{m}/infer waits this long, then 504
    sync_timeout_s: float = setting(30.0, above(0))
    # cap on the ?wait= long-poll of GET /v1/requests/{id}
    max_wait_s: float = setting(60.0, at_least(0))
    # long-poll check for results this gateway did not submit
    poll_interval_ms: int = setting(50, at_least(1))
    retry_after_s: int = setting(1, at_least(0))  # Retry-After of a 429 / 503
    spec_refresh_s: float = setting(5.0, above(0))  # how often tq:models is re-read

    def __post_init__(self) -> None:
        _check_fields(self, "[gateway] ")


@dataclass(frozen=True)
class ModelConfig:
    name: str = field(metadata={ALLOWED: MODEL_NAME})
    path: Path = field()
    inputs: tuple[TensorSpec, ...] = field()
    outputs: tuple[TensorSpec, ...] = field()
    max_batch_size: int = setting(64, at_least(1))  # rows per forward call
    max_delay_ms: float = setting(2.0, at_least(0, 60_000))  # the most a batch waits to fill
    max_queue_len: int = setting(100_000, at_least(1))
    batch_policy: str = setting("fixed", one_of("fixed", "adaptive"))  # see worker/window.py
    # padded size of one forward's inputs
    max_batch_bytes: int = setting(256 * 1024 * 1024, at_least(1))
    # a model with a variable input axis batches requests of similar length (worker/grouping.py)
    group_by_length: bool = setting(True, Allowed())
    # batches a request may be left out of for later arrivals (more than max_delay_ms after it)
    # before it goes in whatever its length
    max_passed_over: int = setting(8, at_least(0))

    def __post_init__(self) -> None:
        _check_fields(self, f"[[models]] {self.name!r} ")
        check_output_axes(self.name, self.inputs, self.outputs)

    def spec(self, version: str = "") -> ModelSpec:
        return ModelSpec(
            name=self.name,
            inputs=self.inputs,
            outputs=self.outputs,
            max_batch_size=self.max_batch_size,
            version=version,
            extra={
                "max_queue_len": self.max_queue_len,
                "max_delay_ms": self.max_delay_ms,
                "max_batch_bytes": self.max_batch_bytes,
            },
        )


@dataclass(frozen=True)
class Settings:
    redis: RedisSettings = field(default_factory=RedisSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    models: tuple[ModelConfig, ...] = ()
    config_path: Path | None = None

    def model(self, name: str) -> ModelConfig:
        for model in self.models:
            if model.name == name:
                return model
        raise ConfigError(f"model {name!r} is not in the configuration")

    def require_models(self) -> tuple[ModelConfig, ...]:
        """The configured models; a ConfigError saying where it looked when there are none."""
        if self.models:
            return self.models
        if self.config_path is not None:
            raise ConfigError(f"config file {self.config_path} declares no [[models]]")
        raise ConfigError(
            f"no [[models]] configured: no --config given, ${CONFIG_ENV} is not set and "
            f"./{DEFAULT_CONFIG} does not exist in {Path.cwd()}"
        )

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


_SECTIONS: dict[str, type[Any]] = {
    "redis": RedisSettings,
    "limits": LimitSettings,
    "worker": WorkerSettings,
    "gateway": GatewaySettings,
}


def load_settings(
    config: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Merge file, environment and overrides (``{"redis.url": ...}``; None values skipped).

    Every value is checked against its field's type and allowed range here; a
    bad one is a ConfigError of one line naming the setting, its source (the
    file, the variable, the flag) and what is allowed."""
    env = os.environ if env is None else env
    path = Path(config) if config else (Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None)
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    unknown = set(raw) - set(_SECTIONS) - {"models"}
    if unknown:
        raise ConfigError(f"config file {path}: unknown section(s) {sorted(unknown)}")

    sections: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"config file {path}: [{section}] must be a table")
        given = dict(raw.get(section, {}))
        fields = {f.name: f for f in dataclasses.fields(cls)}
        bad = set(given) - set(fields)
        if bad:
            raise ConfigError(f"[{section}] has unknown key(s) {sorted(bad)}")
        values: dict[str, Any] = {}
        for name, fld in fields.items():
            # (value, where it came from, whether it is text to parse), last one wins
            chosen: tuple[object, str, bool] | None = None
            if name in given:
                chosen = (given[name], str(path), False)
            env_name = f"{ENV_PREFIX}{section}_{name}".upper()
            if env_name in env:
                chosen = (env[env_name], env_name, True)
            key = f"{section}.{name}"
            override = (overrides or {}).get(key)
            if override is not None:
                chosen = (override, OVERRIDE_FLAGS.get(key, "the command line"), True)
            if chosen is not None:
                value, source, is_text = chosen
                values[name] = _checked(f"[{section}] {name}", fld, value, source, is_text)
        sections[section] = cls(**values)

    base = path.parent if path else Path.cwd()
    raw_models = raw.get("models", [])
    if not isinstance(raw_models, list) or not all(isinstance(m, dict) for m in raw_models):
        raise ConfigError(f"config file {path}: models must be an array of tables [[models]]")
    max_dims = sections["limits"].max_dims
    models = tuple(_model_config(m, base, str(path), max_dims) for m in raw_models)
    names = [m.name for m in models]
    if len(names) != len(set(names)):
        raise ConfigError(f"model names must be unique, got {names}")
    return Settings(models=models, config_path=path, **sections)


# Override keys set by a command-line flag of another name (for the error line).
OVERRIDE_FLAGS = {"redis.url": "--redis"}


def apply_flags(settings: Settings, flags: Mapping[str, tuple[str, object]]) -> Settings:
    """Settings with command-line values applied after loading, each checked
    like the rest and named by its flag: ``{"worker.devices": ("--devices", "cpu")}``
    (None values skipped)."""
    changed: dict[str, dict[str, Any]] = {}
    for key, (flag, value) in flags.items():
        if value is None:
            continue
        section, _, name = key.partition(".")
        fld = {f.name: f for f in dataclasses.fields(_SECTIONS[section])}[name]
        checked = _checked(f"[{section}] {name}", fld, value, flag, isinstance(value, str))
        changed.setdefault(section, {})[name] = checked
    return settings.replace(
        **{
            section: dataclasses.replace(getattr(settings, section), **values)
            for section, values in changed.items()
        }
    )


def _checked(
    setting_name: str, fld: dataclasses.Field[Any], value: object, source: str, is_text: bool
) -> Any:
    """``value`` as the field's type (parsed, if it is text from the
    environment or a flag), if allowed; else the one-line ConfigError."""
    kind = str(fld.type)
    allowed: Allowed = fld.metadata.get(ALLOWED, Allowed())
    parsed = _parse(value, kind) if is_text or kind == "tuple[str, ...]" else _widen(value, kind)
    if not check_value(kind, allowed, parsed):
        raise ConfigError(refusal(setting_name, value, source, kind, allowed))
    return parsed


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse(value: object, kind: str) -> object:
    """Text from the environment or a flag as ``kind``; the text itself when
    it does not parse (the check then refuses it)."""
    if kind == "tuple[str, ...]":  # a TOML list, or a comma-separated string
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return tuple(value) if isinstance(value, list | tuple) else value
    if not isinstance(value, str):
        return _widen(value, kind)
    text = value.strip()
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        return value
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
    return value


def _widen(value: object, kind: str) -> object:
    """A TOML integer in a float field is that float."""
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


_MODEL_KEYS = {
    "name",
    "path",
    "inputs",
    "outputs",
    "max_batch_size",
    "max_delay_ms",
    "max_queue_len",
    "batch_policy",
    "max_batch_bytes",
    "group_by_length",
    "max_passed_over",
}
_TENSOR_KEYS = {"name", "dtype", "shape", "pad_value"}
_MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}


def _model_config(raw: Mapping[str, Any], base: Path, source: str, max_dims: int) -> ModelConfig:
    """One ``[[models]]`` table, every field checked for type and range."""
    label = f"[[models]] {raw.get('name', '?')!r:.70}"
    bad = set(raw) - _MODEL_KEYS
    for kind in ("inputs", "outputs"):
        tensors = raw.get(kind, [])
        if not isinstance(tensors, list) or not all(isinstance(t, dict) for t in tensors):
            raise ConfigError(f"{label}: {kind} must be tables")
        bad |= {f"{kind}.{k}" for t in tensors for k in set(t) - _TENSOR_KEYS}
    if bad:
        raise ConfigError(f"{label}: unknown key(s) {sorted(bad)}")
    for key in ("name", "path"):
        if key not in raw:
            raise ConfigError(f"[[models]] entry needs {key!r} (in {source})")
    name = _checked("[[models]] name", _MODEL_FIELDS["name"], raw["name"], source, False)
    label = f"[[models]] {name!r}"
    if not isinstance(raw["path"], str) or not raw["path"]:
        raise ConfigError(
            f"{label} path = {raw['path']!r:.80} (from {source}): must be a file name"
        )
    path = Path(raw["path"])
    numbers = {
        key: _checked(f"{label} {key}", _MODEL_FIELDS[key], raw[key], source, False)
        for key in _MODEL_KEYS - {"name", "path", "inputs", "outputs"}
        if key in raw
    }
    try:
        return ModelConfig(
            name=name,
            path=path if path.is_absolute() else base / path,
            inputs=_tensors(raw, "inputs", label, source, max_dims),
            outputs=_tensors(raw, "outputs", label, source, max_dims),
            **numbers,
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{label}: {exc}") from None


_TENSOR_SHAPE = "a list of ints, each >= 1 or -1 (variable)"


def _tensors(
    raw: Mapping[str, Any], kind: str, label: str, source: str, max_dims: int
) -> tuple[TensorSpec, ...]:
    """A model's ``[[models.inputs]]`` or ``[[models.outputs]]``: at least one,
    names unique, types checked before ``TensorSpec`` checks dtype and dims."""
    tables = raw.get(kind, [])
    if not tables:
        raise ConfigError(f"{label} declares no {kind} (in {source}): add [[models.{kind}]]")
    tensors = []
    for index, table in enumerate(tables):
        where = f"{label} {kind}[{index}]"
        name = table.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(
                f"{where} name = {name!r:.80} (from {source}): must be a non-empty string"
            )
        where = f"{label} {kind[:-1]} {name!r}"
        dtype, shape = table.get("dtype"), table.get("shape")
        if not isinstance(dtype, str):
            raise ConfigError(
                f"{where} dtype = {dtype!r:.80} (from {source}): must be a dtype name"
            )
        if not isinstance(shape, list) or not all(
            type(d) is int and (d >= 1 or d == -1) for d in shape
        ):
            raise ConfigError(
                f"{where} shape = {shape!r:.80} (from {source}): must be {_TENSOR_SHAPE}"
            )
        if len(shape) + 1 > max_dims:
            raise ConfigError(
                f"{where} shape = {shape!r:.80} (from {source}): must have at most "
                f"{max_dims - 1} dims (with the batch axis, [limits] max_dims {max_dims})"
            )
        pad = table.get("pad_value", 0)
        if isinstance(pad, bool) or not isinstance(pad, int | float) or not math.isfinite(pad):
            raise ConfigError(
                f"{where} pad_value = {pad!r:.80} (from {source}): must be a finite number"
            )
        tensors.append(TensorSpec.from_dict(table))
    names = [t.name for t in tensors]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(
            f"{label} {kind} (from {source}): names must be unique, {twice} given twice"
        )
    return tuple(tensors)
