"""The calibration index: which samples are where, checked against the model's inputs, streamed in batches.

Accepted inputs (a directory, or a single file):

* ``.npy`` -- single-input models only. One array per file, either a batch ``(N, *sample)`` whose rank
  equals the model input's rank, or a single sample (rank one less).
* ``.npz`` -- keys are model input names (a single-input model also accepts a one-array archive
  under any key, e.g. ``arr_0``). All arrays of one file share their leading batch dim, or all are
  single samples. Sequence lengths may differ between files (token models).
* images ``.png/.jpg/.jpeg/.bmp`` -- single 4-D float (or integer) input; decoded with Pillow,
  resized, scaled and normalised per :class:`ImageOptions`. One sample per file.

Arrays of any float type feed any float input (bfloat16 ones too, see ``formats``): they are converted to
the input's dtype batch by batch; integer arrays feed integer inputs. Files are taken in sorted name order,
samples in order within each file. ``labels.npy`` in the directory (or the ``labels=`` file) holds one
integer class id per sample in that order.

Only headers are read at load time (``formats``), so memory use while streaming is one batch plus at most
one open file.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import onnx

from ..batching import fixed_batch, pad_batch
from ..errors import InputError
from ..graph.dtypes import is_float
from ..graph.ir import TensorSpec, interface
from ..paths import confined_file
from .formats import ArrayHeader, Corrupt, fmt_shape, is_int, npy_headers, npz_headers, read_arrays
from .images import IMAGE_EXTENSIONS, ImageOptions, ImagePlan, image_plan, import_pil, load_image, verify_image

log = logging.getLogger("onnx_consensus")

DATA_EXTENSIONS = (".npy", ".npz") + IMAGE_EXTENSIONS
_LABELS_FILE = "labels.npy"


def model_input_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The model's real inputs (``graph.ir.interface``), in graph order. Raises InputError for a non-tensor
    input or an element type with no numpy counterpart."""
    specs = list(interface(model)[0])
    by_name = {v.name: v for v in model.graph.input}
    for s in specs:
        if not by_name[s.name].type.HasField("tensor_type"):
            raise InputError(f"model input {s.name!r} is not a tensor (sequence/map/optional inputs are not supported)")
        if s.dtype is None:
            raise InputError(f"model input {s.name!r} has unsupported element type "
                             f"{by_name[s.name].type.tensor_type.elem_type}")
    return specs


@dataclass(frozen=True)
class _DataFile:
    path: str
    kind: str  # "npy" | "npz" | "image"
    n: int  # samples in the file
    batched: bool  # arrays have a leading batch dim (else the file is one sample)
    arrays: dict[str, ArrayHeader]  # model input name -> header (empty for images)
    sample_shapes: tuple[tuple[int, ...], ...]  # per model input, in spec order
    axes: tuple[int | None, ...] = ()  # per model input: its batch axis in the arrays (None: rank 0); () all 0


def _check_dtype(path: str, key: str, dtype: np.dtype, spec: TensorSpec) -> None:
    target = spec.dtype
    label = f"array {key!r}" if key else "array"
    if is_float(target):
        if is_float(dtype):
            return
        if is_int(dtype):
            raise InputError(f"{path}: {label} has integer dtype {dtype} but model input {spec.name!r} is {target} (float); convert the data to float")
    elif is_int(target):
        if is_int(dtype):
            return
        if is_float(dtype):
            raise InputError(f"{path}: {label} has float dtype {dtype} but model input {spec.name!r} is {target} (integer); give integer data")
    else:
        raise InputError(f"model input {spec.name!r} has unsupported dtype {target}")
    raise InputError(f"{path}: {label} has unsupported dtype {dtype} for model input {spec.name!r} ({target})")


def _sample_layout(path: str, key: str, shape: tuple[int, ...], spec: TensorSpec) -> tuple[bool, int, tuple[int, ...]]:
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
            f"{path}: {label} has shape {fmt_shape(shape)} (rank {len(shape)}) but model input {spec.name!r} "
            f"is {fmt_shape(spec.shape)}: expected rank {rank} (a batch) or {rank - 1} (one sample)"
        )
    for i, (got, want) in enumerate(zip(sample, spec.shape[1:])):
        if isinstance(want, int) and want > 0 and got != want:
            raise InputError(
                f"{path}: {label} has shape {fmt_shape(shape)} but model input {spec.name!r} is "
                f"{fmt_shape(spec.shape)}: dim {i + 1} is {got}, expected {want}"
            )
    return batched, n, tuple(sample)


def _index_array_file(path: str, kind: str, specs: list[TensorSpec]) -> _DataFile:
    headers = npy_headers(path) if kind == "npy" else npz_headers(path)
    arrays: dict[str, ArrayHeader] = {}
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
    for spec in specs:
        _check_dtype(path, keys[spec.name], arrays[spec.name].dtype, spec)
    roles = _roles(specs)
    layouts = {}
    for spec in specs:
        if roles[spec.name] == "batch0":
            layouts[spec.name] = _sample_layout(path, keys[spec.name], arrays[spec.name].shape, spec)
    batched = {b for b, _, _ in layouts.values()}
    if len(batched) > 1:
        raise InputError(f"{path}: mixes batched arrays and single-sample arrays")
    counts = {n for _, n, _ in layouts.values()}
    if len(counts) > 1:
        detail = ", ".join(f"{name}: {n}" for name, (_, n, _) in layouts.items())
        raise InputError(f"{path}: arrays have different batch sizes ({detail})")
    n, is_batched = counts.pop(), batched.pop()
    axes = {name: 0 for name in layouts}
    for spec in specs:
        key, shape = keys[spec.name], arrays[spec.name].shape
        if roles[spec.name] == "scalar":
            if len(shape) != 0:
                raise InputError(f"{path}: array {key or spec.name!r} has shape {fmt_shape(shape)} but model input "
                                 f"{spec.name!r} is a scalar (rank 0); save it as a 0-d array")
            layouts[spec.name], axes[spec.name] = (is_batched, n, ()), None
        elif roles[spec.name] == "inner":
            ax, sample = _inner_layout(path, key, shape, spec, n, is_batched)
            layouts[spec.name], axes[spec.name] = (is_batched, n, sample), ax
    return _DataFile(path, kind, n, is_batched, arrays, tuple(layouts[s.name][2] for s in specs),
                     tuple(axes[s.name] for s in specs))


def _static(d) -> bool:
    return isinstance(d, int) and d > 0


def _roles(specs: list[TensorSpec]) -> dict[str, str]:
    """How each model input is batched: "scalar" (rank 0: no batch, fed as given), "inner" (dim 0 is static
    while the model's batch is dynamic: a state (layers, B, hidden) batched along a later axis), else "batch0"."""
    dynamic_batch = any(s.shape is None or (len(s.shape) and not _static(s.shape[0])) for s in specs)
    roles = {}
    for s in specs:
        if s.shape is not None and len(s.shape) == 0:
            roles[s.name] = "scalar"
        elif dynamic_batch and s.shape is not None and _static(s.shape[0]):
            roles[s.name] = "inner"
        else:
            roles[s.name] = "batch0"
    if all(r != "batch0" for r in roles.values()):  # no input to tell the batch by: dim 0 everywhere
        roles = {name: "scalar" if r == "scalar" else "batch0" for name, r in roles.items()}
    return roles


def _inner_layout(path: str, key: str, shape: tuple[int, ...], spec: TensorSpec, n: int,
                  batched: bool) -> tuple[int, tuple[int, ...]]:
    """(batch axis, sample shape) of an array for an input whose batch axis is not 0: the one dynamic axis
    of the input whose size is the file's sample count ``n`` (single-sample files: the one dynamic axis)."""
    label = f"array {key!r}" if key else "array"
    rank = len(spec.shape)
    dynamic = [k for k in range(1, rank) if not _static(spec.shape[k])]
    if batched and len(shape) == rank:
        cands = [k for k in dynamic if shape[k] == n]
    elif not batched and len(shape) == rank - 1:
        cands = dynamic
    else:
        cands = []
    if len(cands) != 1:
        raise InputError(f"{path}: {label} has shape {fmt_shape(shape)}; model input {spec.name!r} is "
                         f"{fmt_shape(spec.shape)} with a static dim 0, and no single dynamic axis holds the file's "
                         f"{n} sample(s): give it with its batch along one dynamic axis")
    ax = cands[0]
    sample = tuple(shape[:ax]) + tuple(shape[ax + 1:]) if batched else tuple(shape)
    want = tuple(spec.shape[:ax]) + tuple(spec.shape[ax + 1:])
    for i, (got, w) in enumerate(zip(sample, want)):
        if _static(w) and got != w:
            raise InputError(f"{path}: {label} has shape {fmt_shape(shape)} but model input {spec.name!r} is "
                             f"{fmt_shape(spec.shape)}: a dim is {got}, expected {w}")
    return ax, sample


def _index_image_file(path: str, plan: ImagePlan) -> _DataFile:
    verify_image(path)
    return _DataFile(path, "image", 1, False, {}, (plan.sample_shape,))


def _list_files(path: str, labels_path: str | None, follow_symlinks: bool = False) -> list[tuple[str, str]]:
    """[(file path, kind)] in sorted name order. In a folder, every data file must be a regular file inside it
    (``paths.confined_file``: symbolic links out of it only with ``follow_symlinks``; UnsafePathError)."""
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
            k = kind_of(name)
            if name.startswith(".") or os.path.isdir(full) or name == _LABELS_FILE or os.path.abspath(full) in skip \
                    or k is None:
                continue
            out.append((confined_data_file(path, name, follow_symlinks), k))
        return out
    k = kind_of(path)
    if k is None:
        raise InputError(f"{path}: not a calibration data file (expected {', '.join(DATA_EXTENSIONS)} or a directory)")
    return [(path, k)]


def confined_data_file(folder: str, name: str, follow_symlinks: bool = False) -> str:
    """The real path of data file ``name`` of ``folder`` (``paths.confined_file``; UnsafePathError naming it and
    ``--follow-symlinks`` when it links out of the folder)."""
    return confined_file(folder, name, what=f"data file {os.path.join(folder, name)}",
                         follow_symlinks=follow_symlinks, hint="pass --follow-symlinks to read it")


class _Reader:
    """Holds at most one open file: memory maps for .npy / stored .npz, decoded arrays otherwise."""

    def __init__(self, files: list[_DataFile], specs: list[TensorSpec], plan: ImagePlan | None):
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
            return {self._specs[0].name: load_image(f.path, self._plan)[None]}
        arrays = read_arrays(f.path, f.arrays)
        if f.batched:
            return arrays
        axes = dict(zip((s.name for s in self._specs), f.axes or (0,) * len(self._specs)))
        return {name: arr if axes.get(name, 0) is None else np.expand_dims(arr, axes.get(name, 0))
                for name, arr in arrays.items()}

    def close(self) -> None:
        self._arrays = {}
        self._current = None


def _convert(data: np.ndarray, spec: TensorSpec, path: str) -> np.ndarray:
    """Cast a chunk of source rows to the model dtype, checking integer range and finiteness."""
    target = spec.dtype
    if is_int(target) and data.dtype.kind in "iu" and data.size and not np.can_cast(data.dtype, target):
        lo, hi = (0, 1) if target.kind == "b" else (np.iinfo(target).min, np.iinfo(target).max)
        dmin, dmax = int(data.min()), int(data.max())
        if dmin < lo or dmax > hi:
            raise InputError(
                f"{path}: input {spec.name!r} has values in [{dmin}, {dmax}], outside the range of the model's {target}"
            )
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below as a non-finite value
        out = np.array(data, dtype=target, copy=True, order="C")
    if is_float(target) and out.size and not np.isfinite(out).all():
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
        specs: list[TensorSpec],
        files: list[_DataFile],
        n_samples: int,
        labels: np.ndarray | None,
        source: str,
        skipped: list[str],
        image_plan: ImagePlan | None = None,
    ):
        self.specs = list(specs)
        self.n_samples = int(n_samples)
        self.labels = labels
        self.source = source
        self.skipped = list(skipped)
        self._files = files
        self._starts = np.cumsum([0] + [f.n for f in files])[:-1].astype(np.int64)  # first sample of each file
        self._image_plan = image_plan
        self.fixed_batch = fixed_batch(self.specs)
        group_ids: dict[tuple, int] = {}
        # a batch never mixes sample shapes or batch axes, nor files with a rank-0 input (its value is per file)
        keys = [(f.sample_shapes, f.axes, f.path if None in f.axes else None) for f in files]
        self._group = np.array([group_ids.setdefault(k, len(group_ids)) for k in keys], dtype=np.int64)

    @property
    def batch_axes(self) -> dict[str, int | None]:
        """Input name -> the axis of its batch in the fed arrays (0 for most; None for a rank-0 input)."""
        axes = self._files[0].axes if self._files and self._files[0].axes else (0,) * len(self.specs)
        return {s.name: ax for s, ax in zip(self.specs, axes)}

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
        """Yield ``{input name: array (B, *sample shape) in the model dtype}`` with ``1 <= B <= batch_size``
        (the batch along each input's ``batch_axes`` entry; a rank-0 input as given).

        Samples come in the order of ``indices`` (default: all samples in sorted file order). A batch
        is cut short where the next sample's non-batch shape differs (variable sequence lengths), so
        every array in a batch is rectangular. Reads lazily: one batch plus at most one open file
        (memory-mapped where possible) are in memory. Raises InputError naming the file for NaN/Inf
        in float data, out-of-range integers or an unreadable file.

        A model with a fixed batch (``fixed_batch``) gets exactly that many samples per batch whatever
        ``batch_size`` says, a short batch padded by repeating its last sample: use ``counted_batches`` to
        know how many rows are real.
        """
        for feeds, _ in self.counted_batches(batch_size, indices):
            yield feeds

    def counted_batches(self, batch_size: int,
                        indices: Sequence[int] | None = None) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """``batches`` with the number of real samples of each batch: (feeds, n_real). The first n_real
        samples are real, the rest (only with a fixed batch) repeat the last real one."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
        fixed = self.fixed_batch
        if fixed:
            batch_size = fixed
        axes = self.batch_axes
        for feeds, n in self._raw_batches(batch_size, indices):
            if fixed and n < fixed:
                feeds = pad_batch(feeds, fixed, axes)
            yield feeds, n

    def _raw_batches(self, batch_size: int, indices) -> Iterator[tuple[dict[str, np.ndarray], int]]:
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
                yield self._assemble(fis[pos:end], rows[pos:end], reader), end - pos
                pos = end
        finally:
            reader.close()

    def _assemble(self, fis: np.ndarray, rows: np.ndarray, reader: _Reader) -> dict[str, np.ndarray]:
        n = len(fis)
        first_file = self._files[int(fis[0])]
        shapes = first_file.sample_shapes
        axes = dict(zip((s.name for s in self.specs), first_file.axes or (0,) * len(self.specs)))
        out = {}
        for s, shape in zip(self.specs, shapes):
            ax = axes[s.name]
            full = () if ax is None else (*shape[:ax], n, *shape[ax:])
            out[s.name] = np.empty(full, dtype=s.dtype)
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
                ax = axes[spec.name]
                if ax is None:  # rank 0: one value per file, and a batch never spans two such files
                    out[spec.name] = _convert(np.asarray(src), spec, f.path)
                    continue
                if contiguous:
                    chunk = src[(slice(None),) * ax + (slice(int(r[0]), int(r[-1]) + 1),)]
                else:
                    chunk = np.take(src, r, axis=ax)
                converted = _convert(chunk, spec, f.path)
                if mask.all():
                    out[spec.name] = converted
                else:
                    out[spec.name][(slice(None),) * ax + (mask,)] = converted
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
    follow_symlinks: bool = False,
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
        follow_symlinks: read files of the directory (``labels.npy`` too) that are symbolic links to places
            outside it; refused otherwise (UnsafePathError), as are devices and FIFOs.

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
    if all(s.shape is not None and len(s.shape) == 0 for s in specs):
        raise InputError("every model input is a scalar (rank 0): there is no batch to calibrate on")
    if max_samples is not None and max_samples < 1:
        raise InputError(f"max_samples must be >= 1, got {max_samples}")
    if not os.path.exists(source):
        raise InputError(f"calibration data path does not exist: {source}")
    labels_path = labels
    if labels_path is None and os.path.isdir(source) and os.path.lexists(os.path.join(source, _LABELS_FILE)):
        labels_path = confined_data_file(source, _LABELS_FILE, follow_symlinks)

    listing = _list_files(source, labels_path, follow_symlinks)
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
        import_pil()
        plan = image_plan(specs[0], image_options or ImageOptions())

    files: list[_DataFile] = []
    skipped: list[str] = []
    for fpath, kind in listing:
        try:
            f = _index_image_file(fpath, plan) if kind == "image" else _index_array_file(fpath, kind, specs)
        except Corrupt as exc:
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
