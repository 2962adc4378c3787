"""Input files for scoring: open .npy, .npz and .safetensors lazily, and check
them against the model's signature before anything is enqueued.

Rows lie along axis 0. Arrays are memory-mapped (a stored .npz member is
mapped inside the zip; only a compressed member is streamed), read a chunk
at a time, and each chunk's pages are handed back to the kernel once sent
(``release``), so the resident set stays bounded by the in-flight window
however large the file is.

``--input`` takes ``FILE.npy`` (a model with one input), ``NAME=FILE.npy``
(one per input), or ``FILE.npz`` / ``FILE.safetensors`` holding one array
per model input name; other arrays in a container are ignored.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from common.codec import WIRE_DTYPES
from common.spec import VARIABLE, ModelSpec, TensorSpec
from producer.scoring.errors import InputFileError
from producer.scoring.formats import (
    ArrayLocation,
    locate_npy,
    locate_npz,
    locate_safetensors,
    read_npy_header,
)

INPUT_SUFFIXES = (".npy", ".npz", ".safetensors")
_LONE = ""  # the column name of a bare FILE.npy, bound to the model's only input
_FAULT_AROUND = 2 * 1024 * 1024  # the largest neighbourhood one fault maps (a PMD)


class Column(Protocol):
    """One named array of an input file, read by row ranges."""

    @property
    def location(self) -> ArrayLocation: ...

    @property
    def path(self) -> Path: ...

    def rows(self, start: int, stop: int) -> np.ndarray[Any, Any]: ...

    def release(self, start: int, stop: int) -> None: ...

    def close(self) -> None: ...


class _MappedFile:
    """A read-only mapping of a whole file, shared by the columns it holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mmap: mmap.mmap | None = None

    def buffer(self) -> mmap.mmap:
        if self._mmap is None:
            try:
                with self.path.open("rb") as fp:
                    self._mmap = mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise InputFileError(f"{self.path}: cannot map ({exc})") from None
        return self._mmap

    def release(self, start: int, stop: int) -> None:
        """Drop the pages of ``[start, stop)`` bytes from this process (clean,
        file-backed pages: they come back from the page cache if touched again).

        The range is widened backwards by ``_FAULT_AROUND``: a page fault maps
        its whole aligned neighbourhood (fault-around, large folios), which
        reaches back into rows released before and would otherwise stay."""
        if self._mmap is None or stop <= start or not hasattr(self._mmap, "madvise"):
            return
        page = mmap.PAGESIZE
        begin = max(0, start - _FAULT_AROUND) // page * page
        with contextlib.suppress(OSError, ValueError):
            self._mmap.madvise(mmap.MADV_DONTNEED, begin, min(stop, len(self._mmap)) - begin)

    def close(self) -> None:
        if self._mmap is not None:
            with contextlib.suppress(BufferError):  # a caller still holds a view
                self._mmap.close()
                self._mmap = None


class MappedColumn:
    def __init__(self, file: _MappedFile, location: ArrayLocation) -> None:
        self._file = file
        self._location = location
        self._array: np.ndarray[Any, Any] | None = None
        self._row_bytes = math.prod(location.shape[1:]) * location.dtype.itemsize

    @property
    def location(self) -> ArrayLocation:
        return self._location

    @property
    def path(self) -> Path:
        return self._file.path

    def rows(self, start: int, stop: int) -> np.ndarray[Any, Any]:
        if self._array is None:
            loc = self._location
            self._array = np.ndarray(
                loc.shape, loc.dtype, buffer=self._file.buffer(), offset=loc.offset or 0
            )
        return self._array[start:stop]

    def release(self, start: int, stop: int) -> None:
        base = self._location.offset or 0
        self._file.release(base + start * self._row_bytes, base + stop * self._row_bytes)

    def close(self) -> None:
        self._array = None
        self._file.close()


class StreamedColumn:
    """A compressed .npz member: decompressed sequentially, a chunk at a time."""

    def __init__(self, path: Path, location: ArrayLocation) -> None:
        self._path = path
        self._location = location
        self._row_bytes = math.prod(location.shape[1:]) * location.dtype.itemsize
        self._archive: zipfile.ZipFile | None = None
        self._member: IO[bytes] | None = None
        self._next_row = 0

    @property
    def location(self) -> ArrayLocation:
        return self._location

    @property
    def path(self) -> Path:
        return self._path

    def rows(self, start: int, stop: int) -> np.ndarray[Any, Any]:
        where = f"{self._path}[{self._location.member}]"
        try:
            if self._member is None or start < self._next_row:  # (re)start the stream
                self.close()
                self._archive = zipfile.ZipFile(self._path)
                self._member = self._archive.open(self._location.member)
                read_npy_header(self._member, where)
                self._next_row = 0
            if start > self._next_row:
                self._member.read((start - self._next_row) * self._row_bytes)
            want = (stop - start) * self._row_bytes
            data = self._member.read(want)
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise InputFileError(f"{where}: cannot read rows {start}-{stop - 1} ({exc})") from None
        if len(data) != want:
            raise InputFileError(f"{where}: truncated at row {start}")
        self._next_row = stop
        shape = (stop - start, *self._location.shape[1:])
        return np.frombuffer(data, self._location.dtype).reshape(shape)

    def release(self, start: int, stop: int) -> None:
        return None  # nothing is mapped

    def close(self) -> None:
        if self._member is not None:
            self._member.close()
        if self._archive is not None:
            self._archive.close()
        self._member = None
        self._archive = None


@dataclass
class InputSource:
    """The arrays of the input files, by name; nothing is read until asked."""

    columns: dict[str, Column]
    files: tuple[Path, ...]

    def fingerprint(self) -> list[dict[str, Any]]:
        """Identifies the files' contents cheaply (path, size, mtime) for resume checks."""
        prints = []
        for path in self.files:
            stat = path.stat()
            prints.append(
                {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            )
        return prints

    def close(self) -> None:
        for column in self.columns.values():
            column.close()


def open_inputs(specs: Sequence[str]) -> InputSource:
    """Open ``--input`` arguments: ``FILE.npy``, ``NAME=FILE.npy``, ``FILE.npz``,
    ``FILE.safetensors``. Reads headers only."""
    if not specs:
        raise InputFileError("no input file given")
    columns: dict[str, Column] = {}
    origin: dict[str, Path] = {}
    files: list[Path] = []
    for spec in specs:
        name, path = split_input_spec(spec)
        files.append(path)
        found: list[tuple[str, Column]]
        suffix = path.suffix.lower()
        if suffix == ".npy":
            location = locate_npy(path)
            found = [(name or _LONE, MappedColumn(_MappedFile(path), location))]
        elif name:
            raise InputFileError(
                f"--input {spec}: NAME=FILE is for .npy files; {suffix} files name their arrays"
            )
        elif suffix == ".npz":
            mapped = _MappedFile(path)
            found = [
                (loc.name, MappedColumn(mapped, loc) if loc.offset is not None
                 else StreamedColumn(path, loc))
                for loc in locate_npz(path)
            ]  # fmt: skip
        elif suffix == ".safetensors":
            mapped = _MappedFile(path)
            found = [(loc.name, MappedColumn(mapped, loc)) for loc in locate_safetensors(path)]
        else:
            raise InputFileError(
                f"{path}: unsupported input format {suffix or '(no suffix)'!r} "
                f"(use {', '.join(INPUT_SUFFIXES)})"
            )
        for column_name, column in found:
            if column_name in columns:
                raise InputFileError(
                    f"input {column_name or path.name!r} is given twice "
                    f"({origin[column_name]} and {path})"
                )
            columns[column_name] = column
            origin[column_name] = path
    if _LONE in columns and len(columns) > 1:
        raise InputFileError(
            "a bare FILE.npy cannot be combined with other inputs; name it: --input NAME=FILE.npy"
        )
    return InputSource(columns, tuple(files))


@dataclass
class BoundInputs:
    """Input columns matched to a model's declared inputs and checked against them."""

    spec: ModelSpec
    columns: dict[str, Column]  # by model input name, in declared order
    rows: int
    rows_per_request: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one row across all inputs."""
        return sum(_row_bytes(c.location) for c in self.columns.values())

    def chunk(self, start: int, stop: int) -> dict[str, np.ndarray[Any, Any]]:
        """The request inputs for rows ``[start, stop)`` (views into the mapping)."""
        arrays = {}
        for tensor in self.spec.inputs:
            array = self.columns[tensor.name].rows(start, stop)
            storage = WIRE_DTYPES[tensor.dtype]
            if array.dtype != storage:  # another byte order: same values, converted
                array = array.astype(storage)
            arrays[tensor.name] = array
        return arrays

    def release(self, start: int, stop: int) -> None:
        for column in self.columns.values():
            column.release(start, stop)


def bind_inputs(
    source: InputSource,
    spec: ModelSpec,
    *,
    rows_per_request: int | None = None,
    max_payload_bytes: int | None = None,
) -> BoundInputs:
    """Match columns to the model's inputs; InputFileError for any mismatch.

    Checks names, dtypes (exact: no silent casts), per-row shapes (``-1`` axes
    take any length >= 1), equal row counts, and that a request of
    ``rows_per_request`` rows fits the model's ``max_batch_size`` and the
    payload limit.
    """
    columns = dict(source.columns)
    if _LONE in columns:
        if len(spec.inputs) != 1:
            names = ", ".join(repr(t.name) for t in spec.inputs)
            raise InputFileError(
                f"{columns[_LONE].path}: one array, but model {spec.name!r} has inputs {names}: "
                "use an .npz or .safetensors file holding one array per input, "
                "or --input NAME=FILE.npy for each"
            )
        columns = {spec.inputs[0].name: columns[_LONE]}
    bound: dict[str, Column] = {}
    for tensor in spec.inputs:
        column = columns.get(tensor.name)
        if column is None:
            found = ", ".join(repr(n) for n in columns) or "none"
            wanted = ", ".join(repr(t.name) for t in spec.inputs)
            files = ", ".join(str(p) for p in source.files)
            raise InputFileError(
                f"{files}: no array named {tensor.name!r} for model {spec.name!r} "
                f"(model inputs: {wanted}; found: {found})"
            )
        _check_column(column, tensor, spec)
        bound[tensor.name] = column
    rows = _common_rows(bound)
    per_request = rows_per_request or spec.max_batch_size
    if per_request < 1:
        raise InputFileError(f"--rows-per-request must be >= 1, got {per_request}")
    if per_request > spec.max_batch_size:
        raise InputFileError(
            f"--rows-per-request {per_request} exceeds model {spec.name!r} "
            f"max_batch_size {spec.max_batch_size}"
        )
    if max_payload_bytes is not None:
        for tensor in spec.inputs:
            row_bytes = _row_bytes(bound[tensor.name].location)
            if row_bytes * per_request > max_payload_bytes:
                fits = max(1, max_payload_bytes // max(row_bytes, 1))
                raise InputFileError(
                    f"input {tensor.name!r}: {per_request} rows of {row_bytes} bytes exceed the "
                    f"payload limit of {max_payload_bytes} bytes; use --rows-per-request {fits}"
                )
    return BoundInputs(spec, bound, rows, per_request)


def _check_column(column: Column, tensor: TensorSpec, spec: ModelSpec) -> None:
    loc = column.location
    where = f"{column.path}: input {tensor.name!r}"
    if tensor.dtype == "bfloat16":
        raise InputFileError(
            f"model {spec.name!r} input {tensor.name!r} is bfloat16, which tensorq score "
            "cannot read from files yet"
        )
    storage = WIRE_DTYPES[tensor.dtype]
    if loc.label == "bfloat16" or _little(loc.dtype) != storage:
        raise InputFileError(
            f"{where} is {loc.label}, model {spec.name!r} wants {tensor.dtype} "
            f"(convert it, e.g. array.astype('{tensor.dtype}'))"
        )
    wanted = ", ".join("any" if d == VARIABLE else str(d) for d in tensor.shape)
    wanted_text = f"[rows{', ' if wanted else ''}{wanted}]"
    rank_ok = len(loc.shape) == len(tensor.shape) + 1
    if not rank_ok or not all(
        (d == VARIABLE and a >= 1) or a == d
        for a, d in zip(loc.shape[1:], tensor.shape, strict=True)
    ):
        raise InputFileError(
            f"{where} has shape {list(loc.shape)}, model {spec.name!r} wants {wanted_text}"
        )
    if loc.fortran_order and len(loc.shape) > 1:
        raise InputFileError(
            f"{where} is stored in Fortran order, so its rows are not contiguous; "
            "re-save it with np.save(path, np.ascontiguousarray(array))"
        )


def _common_rows(columns: Mapping[str, Column]) -> int:
    counts = {name: c.location.shape[0] for name, c in columns.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name!r} has {n}" for name, n in counts.items())
        raise InputFileError(f"inputs disagree on the number of rows: {listed}")
    rows = next(iter(counts.values()))
    if rows < 1:
        first = next(iter(columns.values()))
        raise InputFileError(f"{first.path}: input {next(iter(columns))!r} has no rows")
    return rows


def _row_bytes(location: ArrayLocation) -> int:
    return math.prod(location.shape[1:]) * location.dtype.itemsize


def _little(dtype: np.dtype[Any]) -> np.dtype[Any]:
    return dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype


def split_input_spec(spec: str) -> tuple[str, Path]:
    """``NAME=FILE`` -> (NAME, FILE); a plain FILE (even one with ``=`` in it) -> ("", FILE)."""
    name, sep, rest = spec.partition("=")
    if sep and name and os.sep not in name and not Path(spec).exists():
        return name, Path(rest)
    return "", Path(spec)
