"""Output files: a fixed-size .npy or .safetensors file written by row ranges
into a temporary ``.partial`` file, renamed over the real name on success,
so a half-written output never looks finished.

The file is laid out completely up front (header, then each output's rows
contiguous) and written with ``pwrite`` at each chunk's offset: results can
arrive in any order, land in input order, and nothing accumulates in memory.
``sync`` (fdatasync) runs before each checkpoint, so a checkpoint never
claims rows that are not on disk.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.codec import WIRE_DTYPES
from common.spec import VARIABLE, ModelSpec
from producer.scoring.errors import ScoringError
from producer.scoring.formats import npy_header, safetensors_header

OUTPUT_FORMATS = {".npy": "npy", ".safetensors": "safetensors"}


def output_format(path: Path) -> str:
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ScoringError(
            f"{path}: unsupported output format {path.suffix or '(no suffix)'!r} "
            f"(use {', '.join(OUTPUT_FORMATS)})"
        )
    return fmt


@dataclass(frozen=True)
class OutputField:
    """One model output as stored: dtype and per-row shape (-1 until resolved)."""

    name: str
    dtype: np.dtype[Any]
    row_shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * self.dtype.itemsize

    @property
    def fill_value(self) -> float | int | bool:
        """What the rows of a failed chunk hold: NaN, or zero for ints and bools."""
        return float("nan") if self.dtype.kind in "fc" else 0


@dataclass(frozen=True)
class OutputLayout:
    fields: tuple[OutputField, ...]

    @classmethod
    def from_spec(cls, spec: ModelSpec, names: Sequence[str] | None, fmt: str) -> OutputLayout:
        """The outputs to store (all by default); .npy holds exactly one.

        bfloat16 outputs are stored as float32 (numpy has no bfloat16).
        """
        declared = {t.name: t for t in spec.outputs}
        chosen = list(names) if names else list(declared)
        unknown = [n for n in chosen if n not in declared]
        if unknown:
            raise ScoringError(
                f"model {spec.name!r} has no output(s) {unknown}; outputs: {sorted(declared)}"
            )
        if len(set(chosen)) != len(chosen):
            raise ScoringError(f"--outputs names an output twice: {chosen}")
        if fmt == "npy" and len(chosen) != 1:
            raise ScoringError(
                f"a .npy file holds one array, but model {spec.name!r} has outputs "
                f"{chosen}: write .safetensors, or pick one with --outputs NAME"
            )
        fields = []
        for name in sorted(chosen) if fmt == "safetensors" else chosen:
            tensor = declared[name]
            dtype = np.dtype("<f4") if tensor.dtype == "bfloat16" else WIRE_DTYPES[tensor.dtype]
            fields.append(OutputField(name, dtype, tensor.shape))
        return cls(tuple(fields))

    @property
    def resolved(self) -> bool:
        """Whether every axis is known (a variable output axis is learnt from
        the first result)."""
        return all(VARIABLE not in f.row_shape for f in self.fields)

    def resolve(self, outputs: Mapping[str, np.ndarray[Any, Any]]) -> OutputLayout:
        fields = []
        for field in self.fields:
            actual = outputs[field.name].shape[1:]
            pairs = zip(actual, field.row_shape, strict=False)
            shape = tuple(a if d == VARIABLE else d for a, d in pairs)
            fields.append(OutputField(field.name, field.dtype, shape))
        return OutputLayout(tuple(fields))

    def check(
        self, outputs: Mapping[str, np.ndarray[Any, Any]], rows: int
    ) -> dict[str, np.ndarray[Any, Any]] | str:
        """The arrays to store, or why they do not fit this layout."""
        checked = {}
        for field in self.fields:
            array = outputs.get(field.name)
            if array is None:
                return f"result has no output {field.name!r}"
            want = (rows, *field.row_shape)
            if array.shape != want or array.dtype != field.dtype:
                return (
                    f"output {field.name!r} is {array.dtype} {list(array.shape)}, "
                    f"expected {field.dtype} {list(want)}"
                )
            checked[field.name] = array
        return checked

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {"name": f.name, "dtype": f.dtype.str, "row_shape": list(f.row_shape)}
            for f in self.fields
        ]

    @classmethod
    def from_json(cls, raw: Sequence[Mapping[str, Any]]) -> OutputLayout:
        fields = (
            OutputField(str(f["name"]), np.dtype(f["dtype"]), tuple(int(d) for d in f["row_shape"]))
            for f in raw
        )
        return cls(tuple(fields))


class OutputFile:
    """A laid-out output file open for writing rows at any position."""

    def __init__(self, path: Path, fd: int, layout: OutputLayout, offsets: Sequence[int]) -> None:
        self.path = path
        self.layout = layout
        self._fd = fd
        self._offsets = dict(zip((f.name for f in layout.fields), offsets, strict=True))

    @staticmethod
    def plan(fmt: str, layout: OutputLayout, rows: int) -> tuple[bytes, list[int], int]:
        """Header bytes, each field's data offset, and the total file size."""
        if fmt == "npy":
            (field,) = layout.fields
            header = npy_header(field.dtype, (rows, *field.row_shape))
            return header, [len(header)], len(header) + rows * field.row_bytes
        header, offsets = safetensors_header(
            [(f.name, f.dtype, (rows, *f.row_shape)) for f in layout.fields]
        )
        return header, offsets, len(header) + rows * sum(f.row_bytes for f in layout.fields)

    @classmethod
    def create(cls, path: Path, fmt: str, layout: OutputLayout, rows: int) -> OutputFile:
        header, offsets, size = cls.plan(fmt, layout, rows)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise ScoringError(f"{path}: cannot create ({exc.strerror or exc})") from None
        try:
            _pwrite_all(fd, header, 0)
            os.ftruncate(fd, size)  # sparse: unwritten rows read as zeros until filled
        except OSError as exc:
            os.close(fd)
            raise ScoringError(f"{path}: cannot write ({exc.strerror or exc})") from None
        return cls(path, fd, layout, offsets)

    @classmethod
    def reopen(cls, path: Path, fmt: str, layout: OutputLayout, rows: int) -> OutputFile:
        """An existing partial file; ScoringError unless it has exactly the expected layout."""
        header, offsets, size = cls.plan(fmt, layout, rows)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise ScoringError(
                f"{path}: the partial output of the checkpoint cannot be opened "
                f"({exc.strerror or exc}); start over with --overwrite"
            ) from None
        if os.fstat(fd).st_size != size or os.pread(fd, len(header), 0) != header:
            os.close(fd)
            raise ScoringError(
                f"{path}: the partial output does not match its checkpoint; "
                "start over with --overwrite"
            )
        return cls(path, fd, layout, offsets)

    def write(self, row: int, arrays: Mapping[str, np.ndarray[Any, Any]]) -> None:
        for field in self.layout.fields:
            data = np.ascontiguousarray(arrays[field.name], dtype=field.dtype)
            self._pwrite(data, self._offsets[field.name] + row * field.row_bytes)

    def fill(self, row: int, count: int) -> None:
        for field in self.layout.fields:
            block = np.full((count, *field.row_shape), field.fill_value, dtype=field.dtype)
            self._pwrite(block, self._offsets[field.name] + row * field.row_bytes)

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _pwrite(self, array: np.ndarray[Any, Any], offset: int) -> None:
        if array.nbytes:
            try:
                _pwrite_all(self._fd, memoryview(array).cast("B"), offset)  # type: ignore[arg-type]
            except OSError as exc:
                raise ScoringError(f"{self.path}: cannot write ({exc.strerror or exc})") from None


def commit(partial: Path, final: Path) -> None:
    """Make the finished partial file the output, atomically and durably."""
    os.replace(partial, final)
    _fsync_dir(final.parent)


def write_atomic(path: Path, text: str) -> None:
    """Write a small text file through a temp file: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as fp:
            fp.write(text)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ScoringError(f"{path}: cannot write ({exc.strerror or exc})") from None


def write_jsonl_atomic(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
