"""On-disk array formats: where each array's bytes lie in a .npy, .npz or
.safetensors file, and the headers tensorq writes.

Reading only parses headers (never the data), so any file size costs the
same to open; every malformed header is an ``InputFileError`` naming the
file. Writers get a header and byte offsets, then fill the data themselves.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from producer.scoring.errors import InputFileError

# safetensors dtype code -> numpy storage dtype. BF16 is kept as its uint16 bits.
_ST_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_ST_CODES: dict[np.dtype[Any], str] = {
    dt: code for code, dt in _ST_DTYPES.items() if code not in ("BF16", "U16")
}
_ST_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
_ZIP_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


@dataclass(frozen=True)
class ArrayLocation:
    """One array in a file: its name, dtype, full shape and where its data starts.

    ``offset`` is None for a compressed .npz member, which has to be streamed.
    ``label`` names the dtype for messages (``bfloat16`` for safetensors BF16).
    """

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    offset: int | None
    label: str
    fortran_order: bool = False
    member: str = ""  # the .npz member holding it

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_npy_header(fp: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """Shape, Fortran order and dtype from a .npy header; ``fp`` is left at the data."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise InputFileError(f"{where}: .npy format version {version} is not supported")
    except (ValueError, SyntaxError, EOFError) as exc:
        raise InputFileError(f"{where}: not a readable .npy file ({_first_line(exc)})") from None
    if dtype.hasobject or dtype.names is not None or dtype.shape != ():
        raise InputFileError(
            f"{where}: holds a {dtype} array; only plain numeric or bool arrays can be scored"
        )
    return tuple(int(d) for d in shape), bool(fortran), dtype


def locate_npy(path: Path) -> ArrayLocation:
    """The single array of a .npy file (named by the file's stem)."""
    where = str(path)
    with _open(path) as fp:
        shape, fortran, dtype = read_npy_header(fp, where)
        offset = fp.tell()
    location = ArrayLocation(path.stem, dtype, shape, offset, dtype.name, fortran)
    _check_size(path, location, offset)
    return location


def locate_npz(path: Path) -> list[ArrayLocation]:
    """Every ``NAME.npy`` member of an .npz file. Stored (uncompressed) members
    get a byte offset into the zip file, so they can be memory-mapped."""
    where = str(path)
    locations = []
    try:
        with _open(path) as raw, zipfile.ZipFile(raw) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                label = f"{where}[{info.filename}]"
                name = info.filename[: -len(".npy")]
                if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
                    raw.seek(info.header_offset)
                    fields = _ZIP_LOCAL_HEADER.unpack(raw.read(_ZIP_LOCAL_HEADER.size))
                    if fields[0] != b"PK\x03\x04":
                        raise InputFileError(f"{label}: corrupt zip entry")
                    start = info.header_offset + _ZIP_LOCAL_HEADER.size + fields[9] + fields[10]
                    raw.seek(start)
                    shape, fortran, dtype = read_npy_header(raw, label)
                    offset: int | None = raw.tell()
                    data_size = info.file_size - (raw.tell() - start)
                else:
                    with archive.open(info) as member:
                        shape, fortran, dtype = read_npy_header(member, label)  # type: ignore[arg-type]
                        data_size = info.file_size - member.tell()
                    offset = None
                location = ArrayLocation(
                    name, dtype, shape, offset, dtype.name, fortran, info.filename
                )
                if data_size < location.nbytes:
                    raise InputFileError(
                        f"{label}: truncated: shape {list(shape)} needs {location.nbytes} bytes "
                        f"of data, the member holds {data_size}"
                    )
                locations.append(location)
    except zipfile.BadZipFile as exc:
        raise InputFileError(f"{where}: not a readable .npz file ({exc})") from None
    if not locations:
        raise InputFileError(f"{where}: holds no arrays")
    return locations


def locate_safetensors(path: Path) -> list[ArrayLocation]:
    """Every tensor of a .safetensors file, validated against the file size."""
    where = str(path)
    with _open(path) as fp:
        size = fp.seek(0, io.SEEK_END)
        fp.seek(0)
        prefix = fp.read(8)
        if len(prefix) < 8:
            raise InputFileError(f"{where}: not a readable .safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _ST_MAX_HEADER or 8 + header_len > size:
            raise InputFileError(
                f"{where}: not a readable .safetensors file (header length {header_len})"
            )
        try:
            header = json.loads(fp.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputFileError(
                f"{where}: not a readable .safetensors file (header is not JSON)"
            ) from None
    if not isinstance(header, dict):
        raise InputFileError(f"{where}: not a readable .safetensors file (header is not a map)")
    data_start = 8 + header_len
    locations = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputFileError(f"{where}: tensor {name!r} has a malformed header entry") from None
        dtype = _ST_DTYPES.get(code)
        if dtype is None:
            raise InputFileError(
                f"{where}: tensor {name!r} has dtype {code}, which tensorq cannot read"
            )
        location = ArrayLocation(
            name, dtype, shape, data_start + begin, "bfloat16" if code == "BF16" else dtype.name
        )
        if any(d < 0 for d in shape) or end - begin != location.nbytes or begin < 0:
            raise InputFileError(
                f"{where}: tensor {name!r}: shape {list(shape)} does not match its data offsets"
            )
        if data_start + end > size:
            raise InputFileError(f"{where}: truncated: tensor {name!r} runs past the end")
        locations.append(location)
    if not locations:
        raise InputFileError(f"{where}: holds no tensors")
    return locations


# -- writing -------------------------------------------------------------------


def npy_header(dtype: np.dtype[Any], shape: Sequence[int]) -> bytes:
    """The header ``np.save`` writes for a C-order array of this dtype and shape."""
    buffer = io.BytesIO()
    header = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": False,
        "shape": tuple(shape),
    }
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def safetensors_header(
    tensors: Sequence[tuple[str, np.dtype[Any], tuple[int, ...]]],
) -> tuple[bytes, list[int]]:
    """Header bytes and each tensor's data offset in the file, in the given order.

    The JSON is padded with spaces to a multiple of 8 bytes, as the format allows.
    """
    entries: dict[str, Any] = {}
    cursor = 0
    for name, dtype, shape in tensors:
        code = _ST_CODES.get(dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype)
        if code is None:
            raise ValueError(f"dtype {dtype} cannot be stored in .safetensors")
        nbytes = math.prod(shape) * dtype.itemsize
        entries[name] = {
            "dtype": code,
            "shape": list(shape),
            "data_offsets": [cursor, cursor + nbytes],
        }
        cursor += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    header = struct.pack("<Q", len(text)) + text
    offsets = [len(header) + e["data_offsets"][0] for e in entries.values()]
    return header, offsets


# -- helpers -------------------------------------------------------------------


def _open(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise InputFileError(f"{path}: cannot open ({exc.strerror or exc})") from None


def _check_size(path: Path, location: ArrayLocation, offset: int) -> None:
    size = path.stat().st_size
    if offset + location.nbytes > size:
        raise InputFileError(
            f"{path}: truncated: shape {list(location.shape)} needs {location.nbytes} bytes "
            f"of data, the file holds {max(0, size - offset)}"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
