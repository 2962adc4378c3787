"""The values tensorq keeps in Redis besides requests and results, one typed
record each, with the only encode/decode of that value:

    WorkerHeartbeat  ``tq:workers`` hash field (JSON): a worker's device, models, stats
    ControlMessage   ``tq:control:db<n>`` pub/sub message (JSON): e.g. a model reload
    ReloadAnswer     ``tq:reply:<token>`` list element (JSON): one worker's reload outcome
    DeadLetter       ``tq:dead:<model>`` stream entry: the raw request and why
    AcceptedMarker   ``tq:acc:<id>`` (JSON): the gateway accepted this async request
                     (the Python client marks a caller-chosen id with the same key)
    BatchRecord      ``tq:batch:<id>`` (JSON): an offline batch's parameters

(The model registry entry, ``tq:models``, is ``common.spec.ModelSpec``'s JSON.)
Readers tolerate fields they do not know, so a newer worker's heartbeat
reads in an older gateway.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# A worker is live while its last heartbeat is this recent and it did not
# sign off (heartbeats come every ``heartbeat_s``, default 1 s).
LIVE_WITHIN_MS = 5000


def now_ms() -> float:
    return time.time() * 1000.0


@dataclass(frozen=True)
class WorkerHeartbeat:
    """What a worker publishes about itself every ``heartbeat_s``."""

    name: str
    pid: int
    alive: bool  # False once it has drained and signed off
    last_seen_ms: int
    started_ms: int = 0
    device: str = ""  # the slot label: cpu:0, cuda:1
    device_info: dict[str, Any] = field(default_factory=dict)  # what torch sees
    models: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    batches: int = 0
    requests: int = 0
    rows: int = 0
    errors: int = 0
    mean_batch_rows: float = 0.0
    # per model: rows_per_s, p50_ms, p99_ms, spark (12 x 5 s rows)
    last_minute: dict[str, dict[str, Any]] = field(default_factory=dict)

    def is_live(self, at_ms: float | None = None) -> bool:
        """Serving now: not signed off, and heard from within ``LIVE_WITHIN_MS``."""
        at = now_ms() if at_ms is None else at_ms
        return self.alive and at - self.last_seen_ms < LIVE_WITHIN_MS

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes | str) -> WorkerHeartbeat:
        return cls(**_known_fields(cls, raw, "a worker heartbeat"))

    def as_report(self, at_ms: float | None = None) -> dict[str, Any]:
        """The record as status pages show it: ``alive`` means live now, plus
        ``last_seen_s_ago``; the device details flattened in."""
        at = now_ms() if at_ms is None else at_ms
        report = {**self.device_info, **asdict(self)}
        del report["device_info"]
        report["alive"] = self.is_live(at)
        report["last_seen_s_ago"] = round((at - self.last_seen_ms) / 1000, 1)
        return report


def _known_fields(record: type, raw: bytes | str, what: str) -> dict[str, Any]:
    """The fields of a JSON object that ``record`` (a dataclass) has: a newer
    writer's extra fields are ignored. ValueError if it is no JSON object."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError(f"{what} is a JSON object")
    known = {f.name for f in fields(record)}
    return {k: v for k, v in data.items() if k in known}


def decode_heartbeats(raw: Mapping[Any, Any]) -> list[WorkerHeartbeat]:
    """Every readable heartbeat of a ``tq:workers`` HGETALL, by worker name."""
    records = []
    for value in raw.values():
        try:
            records.append(WorkerHeartbeat.decode(value))
        except (ValueError, TypeError):  # a foreign or broken field: not a worker of ours
            continue
    return sorted(records, key=lambda r: r.name)


def live_workers(raw: Mapping[Any, Any], at_ms: float | None = None) -> list[WorkerHeartbeat]:
    at = now_ms() if at_ms is None else at_ms
    return [r for r in decode_heartbeats(raw) if r.is_live(at)]


@dataclass(frozen=True)
class AcceptedMarker:
    """Written by the gateway when it accepts an async request: tells
    "pending" (202) from "unknown" (404), refuses a reused id, and keeps
    what the answer must show (the model, the requested outputs)."""

    model: str
    outputs: dict[str, Any] = field(default_factory=dict)  # the gateway's OutputRequest JSON

    def encode(self) -> str:
        return json.dumps({"model": self.model, "outputs": self.outputs})

    @classmethod
    def decode(cls, raw: bytes | str) -> AcceptedMarker:
        """An unreadable marker still marks the request as accepted: its
        fields fall back to empty."""
        try:
            data = json.loads(raw)
        except ValueError:
            return cls("")
        if not isinstance(data, dict):
            return cls("")
        outputs = data.get("outputs")
        return cls(str(data.get("model", "")), outputs if isinstance(outputs, dict) else {})


RELOAD = "reload"


@dataclass(frozen=True)
class ControlMessage:
    """A message to every worker of a deployment on ``tq:control:db<n>``.
    ``reply_to`` (a ``tq:reply:<token>`` list) asks each worker that acts on
    it for a ``ReloadAnswer``; empty: nobody waits for one."""

    op: str  # "reload"
    model: str
    reply_to: str = ""

    def encode(self) -> str:
        body = {"op": self.op, "model": self.model}
        if self.reply_to:
            body["reply_to"] = self.reply_to
        return json.dumps(body)

    @classmethod
    def decode(cls, raw: bytes | str) -> ControlMessage:
        """Raises ValueError for anything but ``{"op": str, "model": str[, "reply_to": str]}``."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("a control message is a JSON object")
        op, model, reply_to = data.get("op"), data.get("model"), data.get("reply_to", "")
        if not isinstance(op, str) or not isinstance(model, str):
            raise ValueError("a control message needs string fields 'op' and 'model'")
        if not isinstance(reply_to, str):
            raise ValueError("a control message's 'reply_to' is a string")
        return cls(op, model, reply_to)


RELOADED, UNCHANGED, FAILED = "reloaded", "unchanged", "failed"


@dataclass(frozen=True)
class ReloadAnswer:
    """What one worker serving a model did with a reload: switched to a new
    version, found the file unchanged, or failed to load it (and kept the old)."""

    model: str
    outcome: str  # reloaded | unchanged | failed
    version: str = ""  # the version it serves now
    previous: str = ""  # the version it served before
    error: str = ""  # why it failed
    worker: str = ""  # filled in by the worker's upkeep, which knows its name

    @property
    def ok(self) -> bool:
        return self.outcome in (RELOADED, UNCHANGED)

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes | str) -> ReloadAnswer:
        data = _known_fields(cls, raw, "a reload answer")
        if not all(isinstance(v, str) for v in data.values()) or "outcome" not in data:
            raise ValueError("a reload answer has string fields, 'outcome' among them")
        return cls(**{"model": "", **data})

    def describe(self) -> str:
        """One line, as ``tensorq models reload`` prints it."""
        if self.outcome == RELOADED:
            versions = f"{self.previous} -> {self.version}"
            return f"{self.worker}: {self.model} reloaded, version {versions}"
        if self.outcome == UNCHANGED:
            return f"{self.worker}: {self.model} unchanged (version {self.version})"
        return (
            f"{self.worker}: {self.model} reload FAILED, still serving version "
            f"{self.version}: {self.error}"
        )


@dataclass(frozen=True)
class DeadLetter:
    """A request no worker could answer: its raw bytes (possibly unreadable),
    why, and the stream entry it came from."""

    raw: bytes
    reason: str
    entry_id: bytes

    def fields(self) -> dict[str, bytes | str]:
        """The stream entry's fields (XADD)."""
        return {"req": self.raw, "reason": self.reason, "entry": self.entry_id}

    @classmethod
    def from_fields(cls, entry: Mapping[bytes, bytes]) -> DeadLetter:
        return cls(
            raw=entry.get(b"req", b""),
            reason=entry.get(b"reason", b"").decode(errors="replace"),
            entry_id=entry.get(b"entry", b""),
        )


@dataclass(frozen=True)
class BatchRecord:
    """An offline batch (``tensorq batch submit``) at ``tq:batch:<id>`` (JSON),
    also written beside its parts as ``batch.json``: its parameters, and the
    arithmetic of its shards (rows, RQ job ids, part file names)."""

    batch_id: str
    model: str
    inputs: tuple[str, ...]  # --input arguments with absolute paths
    output_dir: str
    rows: int
    shard_rows: int
    part_format: str  # npy | safetensors
    outputs: tuple[str, ...]  # stored output names
    options: dict[str, Any]  # rows_per_request, window, on_error, timeout_s, retries
    job_timeout_s: int
    prefix: str
    created_ms: int

    @property
    def shards(self) -> int:
        return -(-self.rows // self.shard_rows)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, self.rows)

    def part_name(self, shard: int) -> str:
        """The shard's part file, in ``output_dir``."""
        return f"part-{shard:05d}.{self.part_format}"

    def job_id(self, shard: int) -> str:
        return f"tensorq-batch-{self.batch_id}-{shard:05d}"

    def encode(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def decode(cls, raw: bytes | str) -> BatchRecord:
        data = _known_fields(cls, raw, "a batch record")
        data["inputs"] = tuple(data.get("inputs", ()))
        data["outputs"] = tuple(data.get("outputs", ()))
        return cls(**data)
