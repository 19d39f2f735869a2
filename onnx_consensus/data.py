"""Calibration / evaluation data, indexed at load time and streamed batch by batch.

Accepted inputs (a directory, or a single file):

* ``.npy`` -- single-input models only. One array per file, either a batch ``(N, *sample)`` whose rank
  equals the model input's rank, or a single sample (rank one less).
* ``.npz`` -- keys are model input names (a single-input model also accepts a one-array archive
  under any key, e.g. ``arr_0``). All arrays of one file share their leading batch dim, or all are
  single samples. Sequence lengths may differ between files (token models).
* images ``.png/.jpg/.jpeg/.bmp`` -- single 4-D float (or integer) input; decoded with Pillow,
  resized, scaled and normalised per :class:`ImageOptions`. One sample per file.

Files are taken in sorted name order, samples in order within each file. ``labels.npy`` in the
directory (or the ``labels=`` file) holds one integer class id per sample in that order.

Only headers are read at load time (``.npy`` and uncompressed ``.npz`` members are later
memory-mapped; a compressed ``.npz`` member is decompressed whole while its file is being read), so
memory use while streaming is one batch plus at most one open file.
"""
from __future__ import annotations

import logging
import math
import os
import struct
import zipfile
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import numpy as np
import onnx

from .errors import InputError

__all__ = [
    "InputSpec",
    "ImageOptions",
    "CalibrationData",
    "model_input_specs",
    "load_calibration",
    "IMAGE_EXTENSIONS",
    "DATA_EXTENSIONS",
]

log = logging.getLogger("onnx_consensus")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
DATA_EXTENSIONS = (".npy", ".npz") + IMAGE_EXTENSIONS
_LABELS_FILE = "labels.npy"


# ----------------------------------------------------------------------------------------------
# model inputs


@dataclass(frozen=True)
class InputSpec:
    """One graph input of the model (initializer-backed inputs excluded).

    Attributes:
        name: graph input name.
        dtype: numpy dtype of the input tensor.
        shape: one entry per dim: an int for a static dim, a str (symbolic name) or None for a
            dynamic dim. The whole shape is None when the model declares no shape (rank unknown).
            Dim 0 is taken to be the batch dim.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None


def model_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs, in graph order. Raises InputError for non-tensor inputs."""
    init_names = {i.name for i in model.graph.initializer}
    specs = []
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        if not inp.type.HasField("tensor_type"):
            raise InputError(f"model input {inp.name!r} is not a tensor (sequence/map/optional inputs are not supported)")
        tt = inp.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception as exc:
            raise InputError(f"model input {inp.name!r} has unsupported element type {tt.elem_type}") from exc
        shape: tuple | None = None
        if tt.HasField("shape"):
            shape = tuple(
                int(d.dim_value) if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)
                for d in tt.shape.dim
            )
        specs.append(InputSpec(inp.name, dtype, shape))
    return specs


def _fmt_shape(shape) -> str:
    if shape is None:
        return "(rank unknown)"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _is_float(dt: np.dtype) -> bool:
    return dt.kind == "f" or dt.name.startswith(("bfloat16", "float8", "float4"))


def _is_int(dt: np.dtype) -> bool:
    return dt.kind in "iub"


# ----------------------------------------------------------------------------------------------
# image options


@dataclass(frozen=True)
class ImageOptions:
    """How image files become model input.

    pixel value p (0..255) -> ``(p * scale - mean[c]) / std[c]`` for float model inputs; integer
    model inputs get the raw pixel values.

    Attributes:
        size: (H, W) to resize to (bilinear); default: the model input's static H, W.
        mean, std: per-channel (length C) or shared (length 1) normalisation, applied after ``scale``.
        layout: "NCHW" or "NHWC": where the channel dim of the model input is.
        channels: 1, 3 or 4; default: the model input's channel dim (grey images are replicated to
            3 channels, colour images converted to grey for 1 channel).
        scale: multiplier applied to raw 0..255 pixel values before mean/std.
    """

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channels: int | None = None
    scale: float = 1.0 / 255.0


@dataclass(frozen=True)
class _ImagePlan:
    height: int
    width: int
    channels: int
    layout: str
    mean: np.ndarray  # (C,) float32
    std: np.ndarray  # (C,) float32
    scale: float
    normalise: bool

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        if self.layout == "NCHW":
            return (self.channels, self.height, self.width)
        return (self.height, self.width, self.channels)


def _import_pil():
    try:
        from PIL import Image  # noqa: PLC0415
    except ImportError as exc:
        raise InputError("image calibration files need Pillow, which is not installed: pip install pillow") from exc
    return Image


def _image_plan(spec: InputSpec, opts: ImageOptions) -> _ImagePlan:
    if opts.layout not in ("NCHW", "NHWC"):
        raise InputError(f"image layout must be 'NCHW' or 'NHWC', got {opts.layout!r}")
    if spec.shape is not None and len(spec.shape) != 4:
        raise InputError(f"image files need a 4-D model input; input {spec.name!r} has shape {_fmt_shape(spec.shape)}")
    if not (_is_float(spec.dtype) or _is_int(spec.dtype)):
        raise InputError(f"image files cannot feed model input {spec.name!r} of dtype {spec.dtype}")
    shape = spec.shape or (None, None, None, None)
    c_dim, h_dim, w_dim = (shape[1], shape[2], shape[3]) if opts.layout == "NCHW" else (shape[3], shape[1], shape[2])
    channels = opts.channels if opts.channels is not None else (c_dim if isinstance(c_dim, int) else 3)
    if channels not in (1, 3, 4):
        raise InputError(f"image channels must be 1, 3 or 4, got {channels} (model input {spec.name!r} {_fmt_shape(spec.shape)}, layout {opts.layout})")
    if isinstance(c_dim, int) and c_dim != channels:
        raise InputError(f"ImageOptions.channels={channels} but model input {spec.name!r} has {c_dim} channels ({opts.layout})")
    if opts.size is not None:
        if len(opts.size) != 2 or any(int(s) <= 0 for s in opts.size):
            raise InputError(f"image size must be (H, W) with positive values, got {opts.size!r}")
        height, width = int(opts.size[0]), int(opts.size[1])
        for got, want, what in ((height, h_dim, "height"), (width, w_dim, "width")):
            if isinstance(want, int) and got != want:
                raise InputError(f"image {what} {got} does not match model input {spec.name!r} {_fmt_shape(spec.shape)} ({opts.layout})")
    elif isinstance(h_dim, int) and isinstance(w_dim, int):
        height, width = h_dim, w_dim
    else:
        raise InputError(
            f"model input {spec.name!r} has dynamic image size {_fmt_shape(spec.shape)}; set ImageOptions.size=(H, W)"
        )
    mean = np.asarray(opts.mean, dtype=np.float32).ravel()
    std = np.asarray(opts.std, dtype=np.float32).ravel()
    for arr, what in ((mean, "mean"), (std, "std")):
        if arr.size not in (1, channels):
            raise InputError(f"image {what} must have 1 or {channels} values, got {arr.size}")
    if np.any(std == 0):
        raise InputError("image std must not contain zeros")
    return _ImagePlan(
        height, width, channels, opts.layout,
        np.broadcast_to(mean, (channels,)).copy(), np.broadcast_to(std, (channels,)).copy(),
        float(opts.scale), _is_float(spec.dtype),
    )


def _load_image(path: str, plan: _ImagePlan) -> np.ndarray:
    """Decode one image into a sample of ``plan.sample_shape`` (float32, or uint8 if not normalised)."""
    Image = _import_pil()
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[plan.channels]
    with Image.open(path) as im:
        im = im.convert(mode)
        if im.size != (plan.width, plan.height):
            im = im.resize((plan.width, plan.height), Image.BILINEAR)
        a = np.asarray(im)
    if a.ndim == 2:
        a = a[..., None]
    if plan.normalise:
        a = (a.astype(np.float32) * np.float32(plan.scale) - plan.mean) / plan.std
    if plan.layout == "NCHW":
        a = a.transpose(2, 0, 1)
    return np.ascontiguousarray(a)


# ----------------------------------------------------------------------------------------------
# headers


class _Corrupt(Exception):
    """A file that cannot be read (skipped unless strict)."""


@dataclass(frozen=True)
class _ArrayHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int | None  # byte offset of the array data in the file when memory-mappable, else None
    member: str | None = None  # zip member name (npz)


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
    return tuple(int(s) for s in shape), bool(fortran), np.dtype(dtype)


def _nbytes(shape, dtype: np.dtype) -> int:
    return int(math.prod(shape)) * dtype.itemsize


def _npy_headers(path: str) -> dict[str, _ArrayHeader]:
    try:
        with open(path, "rb") as fp:
            shape, fortran, dtype = _read_npy_header(fp)
            offset = fp.tell()
        size = os.path.getsize(path)
    except Exception as exc:  # noqa: BLE001 - any failure to parse means the file is unreadable
        raise _Corrupt(f"not a readable .npy file ({exc})") from exc
    if dtype.hasobject:
        raise _Corrupt("holds Python objects (pickled arrays are not supported)")
    if size < offset + _nbytes(shape, dtype):
        raise _Corrupt(f"truncated: header says {shape} {dtype} but the file has only {size - offset} data bytes")
    return {"": _ArrayHeader(shape, dtype, fortran, offset)}


def _npz_headers(path: str) -> dict[str, _ArrayHeader]:
    out: dict[str, _ArrayHeader] = {}
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
                    raise _Corrupt(f"array {key!r} holds Python objects (pickled arrays are not supported)")
                if info.file_size < header_len + _nbytes(shape, dtype):
                    raise _Corrupt(f"array {key!r} is truncated")
                offset = None
                if info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1:
                    raw.seek(info.header_offset)
                    local = raw.read(30)
                    sig, *_, name_len, extra_len = struct.unpack("<4s5H3L2H", local)
                    if sig != b"PK\x03\x04":
                        raise _Corrupt("bad zip local header")
                    offset = info.header_offset + 30 + name_len + extra_len + header_len
                out[key] = _ArrayHeader(shape, dtype, fortran, offset, info.filename)
    except _Corrupt:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _Corrupt(f"not a readable .npz file ({exc})") from exc
    if not out:
        raise _Corrupt("contains no arrays")
    return out


# ----------------------------------------------------------------------------------------------
# files


@dataclass(frozen=True)
class _DataFile:
    path: str
    kind: str  # "npy" | "npz" | "image"
    n: int  # samples in the file
    batched: bool  # arrays have a leading batch dim (else the file is one sample)
    arrays: dict[str, _ArrayHeader]  # model input name -> header (empty for images)
    sample_shapes: tuple[tuple[int, ...], ...]  # per model input, in spec order


def _check_dtype(path: str, key: str, dtype: np.dtype, spec: InputSpec) -> None:
    target = spec.dtype
    label = f"array {key!r}" if key else "array"
    if _is_float(target):
        if _is_float(dtype):
            return
        if _is_int(dtype):
            raise InputError(f"{path}: {label} has integer dtype {dtype} but model input {spec.name!r} is {target} (float); convert the data to float")
    elif _is_int(target):
        if _is_int(dtype):
            return
        if _is_float(dtype):
            raise InputError(f"{path}: {label} has float dtype {dtype} but model input {spec.name!r} is {target} (integer); give integer data")
    else:
        raise InputError(f"model input {spec.name!r} has unsupported dtype {target}")
    raise InputError(f"{path}: {label} has unsupported dtype {dtype} for model input {spec.name!r} ({target})")


def _sample_layout(path: str, key: str, shape: tuple[int, ...], spec: InputSpec) -> tuple[bool, int, tuple[int, ...]]:
    """(batched, n, sample shape) of an array against the model input; raises InputError on mismatch."""
    label = f"array {key!r}" if key else "array"
    if spec.shape is None:
        if len(shape) == 0:
            raise InputError(f"{path}: {label} is a scalar; expected a batch (N, ...) for model input {spec.name!r}")
        return True, shape[0], shape[1:]
    rank = len(spec.shape)
    if len(shape) == rank:
        batched, n, sample = True, shape[0], shape[1:]
    elif len(shape) == rank - 1:
        batched, n, sample = False, 1, shape
    else:
        raise InputError(
            f"{path}: {label} has shape {_fmt_shape(shape)} (rank {len(shape)}) but model input {spec.name!r} "
            f"is {_fmt_shape(spec.shape)}: expected rank {rank} (a batch) or {rank - 1} (one sample)"
        )
    for i, (got, want) in enumerate(zip(sample, spec.shape[1:])):
        if isinstance(want, int) and got != want:
            raise InputError(
                f"{path}: {label} has shape {_fmt_shape(shape)} but model input {spec.name!r} is "
                f"{_fmt_shape(spec.shape)}: dim {i + 1} is {got}, expected {want}"
            )
    return batched, n, tuple(sample)


def _index_array_file(path: str, kind: str, specs: list[InputSpec]) -> _DataFile:
    headers = _npy_headers(path) if kind == "npy" else _npz_headers(path)
    arrays: dict[str, _ArrayHeader] = {}
    if kind == "npy":
        arrays[specs[0].name] = headers[""]
        keys = {specs[0].name: ""}
    else:
        keys = {}
        if len(specs) == 1 and specs[0].name not in headers and len(headers) == 1:
            only = next(iter(headers))
            keys[specs[0].name] = only
        else:
            missing = [s.name for s in specs if s.name not in headers]
            if missing:
                raise InputError(
                    f"{path}: missing model input(s) {', '.join(map(repr, missing))} "
                    f"(archive holds {', '.join(map(repr, sorted(headers)))})"
                )
            keys = {s.name: s.name for s in specs}
        for name, key in keys.items():
            arrays[name] = headers[key]
    layouts = []
    for spec in specs:
        h = arrays[spec.name]
        _check_dtype(path, keys[spec.name], h.dtype, spec)
        layouts.append(_sample_layout(path, keys[spec.name], h.shape, spec))
    batched = {b for b, _, _ in layouts}
    if len(batched) > 1:
        raise InputError(f"{path}: mixes batched arrays and single-sample arrays")
    counts = {n for _, n, _ in layouts}
    if len(counts) > 1:
        detail = ", ".join(f"{s.name}: {n}" for s, (_, n, _) in zip(specs, layouts))
        raise InputError(f"{path}: arrays have different batch sizes ({detail})")
    return _DataFile(path, kind, counts.pop(), batched.pop(), arrays, tuple(s for _, _, s in layouts))


def _index_image_file(path: str, plan: _ImagePlan) -> _DataFile:
    Image = _import_pil()
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # noqa: BLE001
        raise _Corrupt(f"not a readable image ({exc})") from exc
    return _DataFile(path, "image", 1, False, {}, (plan.sample_shape,))


def _list_files(path: str, labels_path: str | None) -> list[tuple[str, str]]:
    """[(file path, kind)] in sorted name order."""
    def kind_of(name: str) -> str | None:
        low = name.lower()
        if low.endswith(".npy"):
            return "npy"
        if low.endswith(".npz"):
            return "npz"
        if low.endswith(IMAGE_EXTENSIONS):
            return "image"
        return None

    if os.path.isdir(path):
        skip = {os.path.abspath(labels_path)} if labels_path else set()
        out = []
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if name.startswith(".") or not os.path.isfile(full) or name == _LABELS_FILE or os.path.abspath(full) in skip:
                continue
            k = kind_of(name)
            if k is not None:
                out.append((full, k))
        return out
    k = kind_of(path)
    if k is None:
        raise InputError(f"{path}: not a calibration data file (expected {', '.join(DATA_EXTENSIONS)} or a directory)")
    return [(path, k)]


# ----------------------------------------------------------------------------------------------
# reading


class _Reader:
    """Holds at most one open file: memory maps for .npy / stored .npz, decoded arrays otherwise."""

    def __init__(self, files: list[_DataFile], specs: list[InputSpec], plan: _ImagePlan | None):
        self._files, self._specs, self._plan = files, specs, plan
        self._current: int | None = None
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, fi: int) -> dict[str, np.ndarray]:
        """Input name -> array of the file (with the leading batch dim, added for single samples)."""
        if fi != self._current:
            self.close()
            f = self._files[fi]
            try:
                self._arrays = self._open(f)
            except InputError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise InputError(f"{f.path}: cannot read file ({exc})") from exc
            self._current = fi
        return self._arrays

    def _open(self, f: _DataFile) -> dict[str, np.ndarray]:
        if f.kind == "image":
            return {self._specs[0].name: _load_image(f.path, self._plan)[None]}
        out: dict[str, np.ndarray] = {}
        zf = None
        try:
            for name, h in f.arrays.items():
                if h.offset is not None:
                    if _nbytes(h.shape, h.dtype) == 0:
                        arr = np.empty(h.shape, h.dtype)
                    else:
                        arr = np.memmap(f.path, dtype=h.dtype, mode="r", offset=h.offset, shape=h.shape,
                                        order="F" if h.fortran else "C")
                else:
                    if zf is None:
                        zf = zipfile.ZipFile(f.path)
                    with zf.open(h.member) as member:
                        arr = np.lib.format.read_array(member, allow_pickle=False)
                out[name] = arr if f.batched else arr[None]
        finally:
            if zf is not None:
                zf.close()
        return out

    def close(self) -> None:
        self._arrays = {}
        self._current = None


def _convert(data: np.ndarray, spec: InputSpec, path: str) -> np.ndarray:
    """Cast a chunk of source rows to the model dtype, checking integer range and finiteness."""
    target = spec.dtype
    if _is_int(target) and data.dtype.kind in "iu" and data.size and not np.can_cast(data.dtype, target):
        lo, hi = (0, 1) if target.kind == "b" else (np.iinfo(target).min, np.iinfo(target).max)
        dmin, dmax = int(data.min()), int(data.max())
        if dmin < lo or dmax > hi:
            raise InputError(
                f"{path}: input {spec.name!r} has values in [{dmin}, {dmax}], outside the range of the model's {target}"
            )
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below as a non-finite value
        out = np.array(data, dtype=target, copy=True, order="C")
    if _is_float(target) and out.size and not np.isfinite(out).all():
        why = "NaN or Inf" if not np.isfinite(np.asarray(data)).all() else f"values that overflow {target}"
        raise InputError(f"{path}: input {spec.name!r} contains {why}")
    return out


class CalibrationData:
    """An index over calibration samples; arrays are read only when batches are produced.

    Attributes:
        specs: the model inputs the data feeds.
        n_samples: number of samples.
        labels: (n_samples,) int64 class ids, or None.
        source: the path the data was loaded from.
        skipped: files skipped as unreadable (non-strict mode).
    """

    def __init__(
        self,
        specs: list[InputSpec],
        files: list[_DataFile],
        n_samples: int,
        labels: np.ndarray | None,
        source: str,
        skipped: list[str],
        image_plan: _ImagePlan | None = None,
    ):
        self.specs = list(specs)
        self.n_samples = int(n_samples)
        self.labels = labels
        self.source = source
        self.skipped = list(skipped)
        self._files = files
        self._starts = np.cumsum([0] + [f.n for f in files])[:-1].astype(np.int64)  # first sample of each file
        self._image_plan = image_plan
        group_ids: dict[tuple, int] = {}
        self._group = np.array([group_ids.setdefault(f.sample_shapes, len(group_ids)) for f in files], dtype=np.int64)

    def __len__(self) -> int:
        return self.n_samples

    def __repr__(self) -> str:
        return (f"CalibrationData(source={self.source!r}, n_samples={self.n_samples}, files={len(self._files)}, "
                f"inputs={[s.name for s in self.specs]}, labels={'yes' if self.labels is not None else 'no'})")

    @property
    def files(self) -> list[str]:
        """Paths of the data files used, in sample order."""
        return [f.path for f in self._files]

    def locate(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(file index, row within file) of each sample index; int64 arrays of the same length."""
        idx = self._check_indices(indices)
        fi = np.searchsorted(self._starts, idx, side="right") - 1
        return fi, idx - self._starts[fi]

    def _check_indices(self, indices) -> np.ndarray:
        if indices is None:
            return np.arange(self.n_samples, dtype=np.int64)
        idx = np.asarray(indices)
        if idx.size == 0:
            return np.zeros(0, dtype=np.int64)
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise InputError(f"sample indices must be a 1-D integer sequence, got {idx.dtype} shape {idx.shape}")
        idx = idx.astype(np.int64)
        if idx.min() < 0 or idx.max() >= self.n_samples:
            raise InputError(f"sample index out of range [0, {self.n_samples}): {int(idx.min())}..{int(idx.max())}")
        return idx

    def batches(self, batch_size: int, indices: Sequence[int] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Yield ``{input name: array (B, *sample shape) in the model dtype}`` with ``1 <= B <= batch_size``.

        Samples come in the order of ``indices`` (default: all samples in sorted file order). A batch
        is cut short where the next sample's non-batch shape differs (variable sequence lengths), so
        every array in a batch is rectangular. Reads lazily: one batch plus at most one open file
        (memory-mapped where possible) are in memory. Raises InputError naming the file for NaN/Inf
        in float data, out-of-range integers or an unreadable file.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
        order = self._check_indices(indices)
        if order.size == 0:
            return
        fis, rows = self.locate(order)
        groups = self._group[fis]
        reader = _Reader(self._files, self.specs, self._image_plan)
        try:
            pos, total = 0, len(order)
            while pos < total:
                end = min(pos + int(batch_size), total)
                change = np.flatnonzero(groups[pos:end] != groups[pos])
                if change.size:
                    end = pos + int(change[0])
                yield self._assemble(fis[pos:end], rows[pos:end], reader)
                pos = end
        finally:
            reader.close()

    def _assemble(self, fis: np.ndarray, rows: np.ndarray, reader: _Reader) -> dict[str, np.ndarray]:
        n = len(fis)
        shapes = self._files[int(fis[0])].sample_shapes
        out = {s.name: np.empty((n, *shape), dtype=s.dtype) for s, shape in zip(self.specs, shapes)}
        # visit each file once, in order of first appearance
        _, first = np.unique(fis, return_index=True)
        for fi in fis[np.sort(first)]:
            mask = fis == fi
            r = rows[mask]
            f = self._files[int(fi)]
            arrays = reader.get(int(fi))
            contiguous = r.size and r[-1] - r[0] == r.size - 1 and (r.size == 1 or np.all(np.diff(r) == 1))
            for spec in self.specs:
                src = arrays[spec.name]
                chunk = src[int(r[0]): int(r[-1]) + 1] if contiguous else src[r]
                converted = _convert(chunk, spec, f.path)
                if mask.all():
                    out[spec.name] = converted
                else:
                    out[spec.name][mask] = converted
        return out

    def labels_for(self, indices) -> np.ndarray | None:
        """(len(indices),) int64 labels of the given samples, or None without labels."""
        if self.labels is None:
            return None
        return self.labels[self._check_indices(indices)]

    def split(self, holdout_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Seeded random partition into (score_indices, holdout_indices), each sorted ascending (int64).

        The holdout gets ``round(holdout_fraction * n)`` samples, clamped to [1, n - 1] when n >= 2
        (so both parts are non-empty); with n == 1 the holdout is empty.
        """
        if not 0.0 <= float(holdout_fraction) < 1.0:
            raise InputError(f"holdout fraction must be in [0, 1), got {holdout_fraction}")
        n = self.n_samples
        if n < 2:
            return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
        k = min(max(int(round(holdout_fraction * n)), 1), n - 1)
        perm = np.random.default_rng(seed).permutation(n)
        return np.sort(perm[k:]).astype(np.int64), np.sort(perm[:k]).astype(np.int64)

    def validate(self, batch_size: int = 256) -> None:
        """Stream every sample once, raising InputError at the first NaN/Inf, out-of-range or unreadable file."""
        for _ in self.batches(batch_size):
            pass


# ----------------------------------------------------------------------------------------------
# loading


def _load_labels(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise InputError(f"labels file does not exist: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: cannot read labels ({exc})") from exc
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{path}: labels must be a .npy array, not an archive")
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise InputError(f"{path}: labels must be 1-D (one class id per sample), got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise InputError(f"{path}: labels must be integer class ids, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise InputError(f"{path}: labels must be non-negative class ids, found {int(arr.min())}")
    return arr.astype(np.int64)


def load_calibration(
    path,
    model: onnx.ModelProto | str,
    *,
    labels: str | None = None,
    image_options: ImageOptions | None = None,
    strict: bool = False,
    max_samples: int | None = None,
) -> CalibrationData:
    """Index calibration data at ``path`` (a directory or one file) for ``model``'s inputs.

    Reads only file headers. Shapes and dtypes are checked against the model inputs here; values
    (NaN/Inf, integer range) when batches are produced, or all at once with ``validate()``.

    Args:
        path: directory of data files, or a single .npy/.npz/image file.
        model: the ONNX model, or a path to it (external data is not loaded).
        labels: path to a .npy of integer class ids; default ``labels.npy`` in the directory.
        image_options: preprocessing for image files.
        strict: raise on an unreadable file instead of skipping it with a warning.
        max_samples: keep only the first ``max_samples`` samples (sorted file order).

    Raises:
        InputError: one line naming the file and the problem.
    """
    source = os.fspath(path)
    if isinstance(model, (str, os.PathLike)):
        try:
            model = onnx.load(os.fspath(model), load_external_data=False)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{model}: cannot load ONNX model ({exc})") from exc
    specs = model_input_specs(model)
    if not specs:
        raise InputError("the model has no inputs to feed")
    for s in specs:
        if s.shape is not None and len(s.shape) == 0:
            raise InputError(f"model input {s.name!r} is a scalar (rank 0); calibration batches need a batch dim")
    if max_samples is not None and max_samples < 1:
        raise InputError(f"max_samples must be >= 1, got {max_samples}")
    if not os.path.exists(source):
        raise InputError(f"calibration data path does not exist: {source}")
    labels_path = labels
    if labels_path is None and os.path.isdir(source) and os.path.isfile(os.path.join(source, _LABELS_FILE)):
        labels_path = os.path.join(source, _LABELS_FILE)

    listing = _list_files(source, labels_path)
    if not listing:
        raise InputError(f"{source}: no data files ({', '.join(DATA_EXTENSIONS)})")
    kinds = {k for _, k in listing}
    if len(specs) > 1 and kinds - {"npz"}:
        raise InputError(
            f"{source}: the model has {len(specs)} inputs ({', '.join(s.name for s in specs)}); "
            "give .npz files keyed by input name"
        )
    plan = None
    if "image" in kinds:
        _import_pil()
        plan = _image_plan(specs[0], image_options or ImageOptions())

    files: list[_DataFile] = []
    skipped: list[str] = []
    for fpath, kind in listing:
        try:
            f = _index_image_file(fpath, plan) if kind == "image" else _index_array_file(fpath, kind, specs)
        except _Corrupt as exc:
            if strict:
                raise InputError(f"{fpath}: {exc}") from exc
            log.warning("skipping unreadable calibration file %s: %s", fpath, exc)
            skipped.append(fpath)
            continue
        if f.n == 0:
            log.warning("calibration file %s holds no samples; ignored", fpath)
            continue
        files.append(f)
    if not files:
        if skipped:
            raise InputError(f"{source}: no readable data files ({len(skipped)} unreadable, e.g. {skipped[0]})")
        raise InputError(f"{source}: no samples in the data files")

    total = sum(f.n for f in files)
    label_arr = None
    if labels_path is not None:
        label_arr = _load_labels(labels_path)
        if skipped:
            raise InputError(
                f"{labels_path}: labels cannot be aligned with the samples because {len(skipped)} file(s) were "
                f"skipped as unreadable (e.g. {skipped[0]}); fix or remove them"
            )
        if len(label_arr) != total:
            raise InputError(f"{labels_path}: {len(label_arr)} labels for {total} samples; lengths must match")

    n = total
    if max_samples is not None and max_samples < total:
        n = int(max_samples)
        kept, count = [], 0
        for f in files:
            if count >= n:
                break
            kept.append(f)
            count += f.n
        files = kept
        if label_arr is not None:
            label_arr = label_arr[:n]
    return CalibrationData(specs, files, n, label_arr, source, skipped, plan)
