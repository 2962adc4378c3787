"""Settings: TOML file -> ``TQ_*`` environment -> CLI flags -> one frozen object.

Built once at the edge (the CLI or a test fixture) and passed down; nothing
below reads the environment or a file. Scalar settings live in sections;
the environment variable of ``[worker] block_ms`` is ``TQ_WORKER_BLOCK_MS``
and its override key ``"worker.block_ms"``. Models come from the file only.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.codec import CodecLimits
from common.errors import ConfigError
from common.spec import ModelSpec, TensorSpec

ENV_PREFIX = "TQ_"
CONFIG_ENV = "TQ_CONFIG"


CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


@dataclass(frozen=True)
class RedisSettings:
    url: str = ""  # empty: a private redis-server is started
    prefix: str = "tq"
    socket_timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    max_connections: int = 64
    result_ttl_s: int = 3600
    cluster: bool = False  # also implied by a redis+cluster:// URL

    def with_url(self, url: str) -> RedisSettings:
        return dataclasses.replace(self, url=url)

    @property
    def is_cluster(self) -> bool:
        """Redis Cluster: every component uses ``redis.asyncio.RedisCluster``."""
        return self.cluster or self.url.split("://", 1)[0] in CLUSTER_SCHEMES


@dataclass(frozen=True)
class LimitSettings:
    max_payload_bytes: int = 64 * 1024 * 1024
    max_dims: int = 8

    def codec(self) -> CodecLimits:
        return CodecLimits(self.max_payload_bytes, self.max_dims)


@dataclass(frozen=True)
class WorkerSettings:
    devices: str = "auto"  # cuda:0,cuda:1 | cpu | cpu*2 | auto
    block_ms: int = 500  # longest XREADGROUP block; also how fast a stop is noticed
    claim_idle_ms: int = 30_000  # visibility timeout before another worker reclaims
    max_deliveries: int = 3
    drain_grace_s: float = 30.0
    heartbeat_s: float = 1.0
    threads: int = 0  # intra-op threads per CPU slot; 0 = cores / slots
    crash_on_request_prefix: str = ""  # test-only fault hook: SIGKILL on such request ids
    watch_models: bool = False  # reload a model when its file changes
    batch_policy: str = ""  # fixed | adaptive for every model; empty = each model's own
    metrics_port: int = 0  # >0: the pool serves worker histograms (Prometheus) on this port


@dataclass(frozen=True)
class GatewaySettings:
    """``tensorq gateway``: the HTTP front door (see producer/gateway)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 64 * 1024 * 1024  # larger bodies get 413
    # Bearer tokens; empty = no auth. TQ_GATEWAY_TOKENS is comma separated.
    tokens: tuple[str, ...] = field(default=(), repr=False)
    sync_timeout_s: float = 30.0  # POST /v2/models/{m}/infer waits this long, then 504
    max_wait_s: float = 60.0  # cap on the ?wait= long-poll of GET /v1/requests/{id}
    poll_interval_ms: int = 50  # long-poll check for results this gateway did not submit
    retry_after_s: int = 1  # Retry-After of a 429 (queue full)
    spec_refresh_s: float = 5.0  # how often tq:models is re-read


@dataclass(frozen=True)
class ModelConfig:
    name: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 64
    max_delay_ms: float = 2.0
    max_queue_len: int = 100_000
    batch_policy: str = "fixed"  # fixed | adaptive (see worker/window.py)
    max_batch_bytes: int = 256 * 1024 * 1024  # padded size of one forward's inputs

    def __post_init__(self) -> None:
        if self.batch_policy not in ("fixed", "adaptive"):
            raise ConfigError(
                f"model {self.name!r}: batch_policy must be fixed or adaptive, "
                f"got {self.batch_policy!r}"
            )

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
    """Merge file, environment and overrides (``{"redis.url": ...}``; None values skipped)."""
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
        values = dict(raw.get(section, {}))
        fields = {f.name: f for f in dataclasses.fields(cls)}
        bad = set(values) - set(fields)
        if bad:
            raise ConfigError(f"[{section}] has unknown key(s) {sorted(bad)}")
        for name, fld in fields.items():
            env_name = f"{ENV_PREFIX}{section}_{name}".upper()
            if env_name in env:
                values[name] = _coerce(env[env_name], fld.type, env_name)
            override = (overrides or {}).get(f"{section}.{name}")
            if override is not None:
                values[name] = _coerce(override, fld.type, f"--{name}")
            elif name in values:
                values[name] = _coerce(values[name], fld.type, f"[{section}] {name}")
        sections[section] = cls(**values)

    base = path.parent if path else Path.cwd()
    raw_models = raw.get("models", [])
    if not isinstance(raw_models, list) or not all(isinstance(m, dict) for m in raw_models):
        raise ConfigError(f"config file {path}: models must be an array of tables [[models]]")
    models = tuple(_model_config(m, base) for m in raw_models)
    names = [m.name for m in models]
    if len(names) != len(set(names)):
        raise ConfigError(f"model names must be unique, got {names}")
    return Settings(models=models, config_path=path, **sections)


def _coerce(value: object, type_name: object, where: str) -> Any:
    if str(type_name) == "tuple[str, ...]":  # a TOML list, or a comma-separated string
        return _coerce_strings(value, where)
    kind = {"str": str, "int": int, "float": float, "bool": bool}.get(str(type_name), str)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if isinstance(value, str):
        try:
            if kind is bool:
                return value.strip().lower() in ("1", "true", "yes", "on")
            return kind(value)
        except ValueError:
            raise ConfigError(f"{where}: {value!r} is not a valid {kind.__name__}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"{where}: expected {kind.__name__}, got {type(value).__name__}")


def _coerce_strings(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{where}: expected a list of strings, got {type(value).__name__}")


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
}
_TENSOR_KEYS = {"name", "dtype", "shape", "pad_value"}


def _model_config(raw: Mapping[str, Any], base: Path) -> ModelConfig:
    bad = set(raw) - _MODEL_KEYS
    for kind in ("inputs", "outputs"):
        tensors = raw.get(kind, [])
        if not isinstance(tensors, list) or not all(isinstance(t, dict) for t in tensors):
            raise ConfigError(f"[[models]] {raw.get('name', '?')!r}: {kind} must be tables")
        bad |= {f"{kind}.{k}" for t in tensors for k in set(t) - _TENSOR_KEYS}
    if bad:
        raise ConfigError(f"[[models]] {raw.get('name', '?')!r}: unknown key(s) {sorted(bad)}")
    try:
        name = str(raw["name"])
        path = Path(raw["path"])
        return ModelConfig(
            name=name,
            path=path if path.is_absolute() else base / path,
            inputs=tuple(TensorSpec.from_dict(t) for t in raw.get("inputs", [])),
            outputs=tuple(TensorSpec.from_dict(t) for t in raw.get("outputs", [])),
            max_batch_size=int(raw.get("max_batch_size", 64)),
            max_delay_ms=float(raw.get("max_delay_ms", 2.0)),
            max_queue_len=int(raw.get("max_queue_len", 100_000)),
            batch_policy=str(raw.get("batch_policy", "fixed")),
            max_batch_bytes=int(raw.get("max_batch_bytes", ModelConfig.max_batch_bytes)),
        )
    except KeyError as exc:
        raise ConfigError(f"[[models]] entry needs {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[[models]] {raw.get('name', '?')!r}: {exc}") from None
