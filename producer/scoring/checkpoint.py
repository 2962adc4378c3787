"""Resume state of a scoring run, kept in a JSON file next to the output.

A checkpoint records what the run is (model, input files with size and
mtime, row range, output format and layout) and which rows are finished:
written to the ``.partial`` file and synced before the checkpoint that
claims them is written (atomically: temp file, fsync, rename). Rows of
failed chunks skipped under ``--on-error skip`` count as finished; their
errors travel in the checkpoint so a resumed run reports them too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer.scoring.errors import ScoringError
from producer.scoring.outputs import OutputLayout, write_atomic
from producer.scoring.ranges import RangeSet

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class ScorePaths:
    """The files of one run: the output, its partial, checkpoint and errors files."""

    output: Path
    partial: Path
    checkpoint: Path
    errors: Path

    @classmethod
    def for_output(cls, output: Path, errors: Path | None = None) -> ScorePaths:
        return cls(
            output=output,
            partial=output.with_name(output.name + ".partial"),
            checkpoint=output.with_name(output.name + ".checkpoint.json"),
            errors=errors or output.with_name(output.name + ".errors.jsonl"),
        )


@dataclass(frozen=True)
class Failure:
    """A chunk the pool could not score; rows are input-file rows, ``[start, stop)``."""

    start: int
    stop: int
    code: str
    message: str
    request_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "stop": self.stop,
            "rows": self.stop - self.start,
            "code": self.code,
            "message": self.message,
            "request_id": self.request_id,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Failure:
        return cls(
            int(raw["start"]),
            int(raw["stop"]),
            str(raw["code"]),
            str(raw["message"]),
            str(raw.get("request_id", "")),
        )


@dataclass
class Checkpoint:
    identity: dict[str, Any]
    layout: OutputLayout | None = None  # set once the output file exists
    done: RangeSet = field(default_factory=RangeSet)
    failures: list[Failure] = field(default_factory=list)

    def save(self, path: Path) -> None:
        body = {
            "version": CHECKPOINT_VERSION,
            "identity": self.identity,
            "layout": self.layout.to_json() if self.layout else None,
            "done": [list(r) for r in self.done.ranges],
            "failures": [f.to_json() for f in self.failures],
        }
        write_atomic(path, json.dumps(body, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        try:
            body = json.loads(path.read_text())
            if body.get("version") != CHECKPOINT_VERSION:
                raise ValueError(f"version {body.get('version')!r}")
            layout = body["layout"]
            return cls(
                identity=dict(body["identity"]),
                layout=OutputLayout.from_json(layout) if layout else None,
                done=RangeSet((int(a), int(b)) for a, b in body["done"]),
                failures=[Failure.from_json(f) for f in body["failures"]],
            )
        except OSError as exc:
            raise ScoringError(f"{path}: cannot read the checkpoint ({exc.strerror})") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ScoringError(
                f"{path}: not a usable checkpoint ({exc}); start over with --overwrite"
            ) from None

    def mismatch(self, identity: Mapping[str, Any]) -> str | None:
        """What differs between this checkpoint's run and ``identity``, if anything."""
        for key in sorted(set(self.identity) | set(identity)):
            then, now = self.identity.get(key), identity.get(key)
            if then != now:
                return f"{key}: checkpoint has {then!r}, now {now!r}"
        return None
