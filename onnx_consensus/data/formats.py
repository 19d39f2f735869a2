"""Array file formats: ``.npy`` / ``.npz`` headers read without the data, memory-mapped reading, dtypes.

Only headers are read when data is indexed; ``.npy`` files and uncompressed (stored) ``.npz`` members are
later memory-mapped, a compressed ``.npz`` member is decompressed whole when its file is read: its declared size
is checked against ``limits.memory_budget()`` first (a compression bomb is refused before a byte is inflated).
Arrays of Python objects are refused outright (reading them would unpickle: run code from the file).

bfloat16: NumPy has no bfloat16 type, so an ml_dtypes bfloat16 array is saved (``np.save``, ``np.savez``)
with the descriptor ``'<V2'`` (two raw bytes) and loads back as raw bytes. A 2-byte void array without
fields is therefore read as bfloat16 (``logical_dtype``), the only 2-byte float type that saves that way
(float16 saves as ``'<f2'``).
"""
from __future__ import annotations

import math
import os
import struct
import zipfile
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, ResourceLimitError
from ..limits import format_size, memory_budget


class Corrupt(Exception):
    """A file that cannot be read (skipped unless strict)."""


@dataclass(frozen=True)
class ArrayHeader:
    """Where one array is and what it holds, from its header alone.

    Attributes:
        shape: the array's shape.
        dtype: its element type (``logical_dtype`` of the stored descriptor: bfloat16 for ``'<V2'``).
        fortran: column-major storage.
        offset: byte offset of the array data in the file when it can be memory-mapped, else None.
        member: zip member name (``.npz``), None for ``.npy``.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int | None
    member: str | None = None


def bfloat16() -> np.dtype:
    """ml_dtypes' bfloat16 (installed with onnx)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def logical_dtype(dtype: np.dtype) -> np.dtype:
    """The element type an array stored with ``dtype`` holds: bfloat16 for a plain 2-byte void (how
    ml_dtypes bfloat16 arrays are saved), ``dtype`` itself otherwise."""
    if dtype.kind == "V" and dtype.itemsize == 2 and dtype.fields is None and dtype.subdtype is None:
        return bfloat16()
    return dtype


def is_int(dt: np.dtype) -> bool:
    """Integer or boolean."""
    return dt.kind in "iub"


def fmt_shape(shape) -> str:
    """``(N, 3, ?, 8)`` for error messages; ``(rank unknown)`` for None."""
    if shape is None:
        return "(rank unknown)"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def nbytes(shape, dtype: np.dtype) -> int:
    return int(math.prod(shape)) * dtype.itemsize


def _read_npy_header(fp) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        reader = getattr(np.lib.format, "_read_array_header", None)
        if reader is None:
            raise ValueError(f"unsupported .npy format version {version}")
        shape, fortran, dtype = reader(fp, version)
    return tuple(int(s) for s in shape), bool(fortran), logical_dtype(np.dtype(dtype))


def npy_headers(path: str) -> dict[str, ArrayHeader]:
    """``{"": header}`` of a ``.npy`` file; raises Corrupt for an unreadable, pickled or truncated file."""
    try:
        with open(path, "rb") as fp:
            shape, fortran, dtype = _read_npy_header(fp)
            offset = fp.tell()
        size = os.path.getsize(path)
    except Exception as exc:  # noqa: BLE001 - any failure to parse means the file is unreadable
        raise Corrupt(f"not a readable .npy file ({exc})") from exc
    if dtype.hasobject:
        raise InputError(f"{path}: holds Python objects (a pickle, which could run code when read); refusing it")
    if size < offset + nbytes(shape, dtype):
        raise Corrupt(f"truncated: header says {shape} {dtype} but the file has only {size - offset} data bytes")
    return {"": ArrayHeader(shape, dtype, fortran, offset)}


def npz_headers(path: str) -> dict[str, ArrayHeader]:
    """``{key: header}`` of the arrays of a ``.npz`` archive (stored members get a mappable offset);
    raises Corrupt for an unreadable archive, a pickled or truncated member, or no arrays."""
    out: dict[str, ArrayHeader] = {}
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename[: -len(".npy")]
                with zf.open(info) as member:
                    shape, fortran, dtype = _read_npy_header(member)
                    header_len = member.tell()
                if dtype.hasobject:
                    raise InputError(f"{path}: array {key!r} holds Python objects (a pickle, which could run code "
                                     "when read); refusing it")
                if info.file_size < header_len + nbytes(shape, dtype):
                    raise Corrupt(f"array {key!r} is truncated")
                if info.compress_type != zipfile.ZIP_STORED and \
                        max(nbytes(shape, dtype), info.file_size) > memory_budget():
                    raise ResourceLimitError(
                        f"{path}: compressed array {key!r} would inflate to "
                        f"{format_size(max(nbytes(shape, dtype), info.file_size))}, over the memory budget of "
                        f"{format_size(memory_budget())}; store it uncompressed (np.savez) or split it")
                offset = None
                if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
                    raw.seek(info.header_offset)
                    local = raw.read(30)
                    sig, *_, name_len, extra_len = struct.unpack("<4s5H3L2H", local)
                    if sig != b"PK\x03\x04":
                        raise Corrupt("bad zip local header")
                    offset = info.header_offset + 30 + name_len + extra_len + header_len
                out[key] = ArrayHeader(shape, dtype, fortran, offset, info.filename)
    except (Corrupt, InputError):
        raise
    except Exception as exc:  # noqa: BLE001
        raise Corrupt(f"not a readable .npz file ({exc})") from exc
    if not out:
        raise Corrupt("contains no arrays")
    return out


def read_arrays(path: str, headers: dict[str, ArrayHeader]) -> dict[str, np.ndarray]:
    """``{name: array}`` for the ``headers`` (by any name) of file ``path``: read-only memory maps where
    the header has an offset, decompressed arrays otherwise; each in its header's (logical) dtype."""
    out: dict[str, np.ndarray] = {}
    zf = None
    try:
        for name, h in headers.items():
            if h.offset is not None:
                if nbytes(h.shape, h.dtype) == 0:
                    arr = np.empty(h.shape, h.dtype)
                else:
                    arr = np.memmap(path, dtype=h.dtype, mode="r", offset=h.offset, shape=h.shape,
                                    order="F" if h.fortran else "C")
            else:
                if zf is None:
                    zf = zipfile.ZipFile(path)
                with zf.open(h.member) as member:
                    arr = np.lib.format.read_array(member, allow_pickle=False)
                if arr.dtype != h.dtype:
                    arr = arr.view(h.dtype)  # raw 2-byte void -> bfloat16 (same bytes)
            out[name] = arr
    finally:
        if zf is not None:
            zf.close()
    return out
