"""Indexing calibration files against the model's inputs (headers only: which samples are in which file, at
which batch axis, checked against each input's dtype and shape), and reading them back one file at a time
(``Reader``), converted to the model's dtypes (``convert``). ``calibration.CalibrationData`` streams batches
through them; see ``calibration``'s docstring for the accepted files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..graph.dtypes import is_float
from ..graph.ir import TensorSpec
from ..paths import confined_file
from .formats import ArrayHeader, fmt_shape, is_int, npy_headers, npz_headers, read_arrays
from .images import IMAGE_EXTENSIONS, ImagePlan, load_image, verify_image

DATA_EXTENSIONS = (".npy", ".npz") + IMAGE_EXTENSIONS
LABELS_FILE = "labels.npy"


@dataclass(frozen=True)
class DataFile:
    """One indexed data file: its samples and, per model input, its array header, sample shape and batch axis."""

    path: str
    kind: str  # "npy" | "npz" | "image"
    n: int  # samples in the file
    batched: bool  # arrays have a leading batch dim (else the file is one sample)
    arrays: dict[str, ArrayHeader]  # model input name -> header (empty for images)
    sample_shapes: tuple[tuple[int, ...], ...]  # per model input, in spec order
    axes: tuple[int | None, ...] = ()  # per model input: its batch axis in the arrays (None: rank 0); () all 0


def check_dtype(path: str, key: str, dtype: np.dtype, spec: TensorSpec) -> None:
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


def sample_layout(path: str, key: str, shape: tuple[int, ...], spec: TensorSpec) -> tuple[bool, int, tuple[int, ...]]:
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


def index_array_file(path: str, kind: str, specs: list[TensorSpec]) -> DataFile:
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
        check_dtype(path, keys[spec.name], arrays[spec.name].dtype, spec)
    roles = input_roles(specs)
    layouts = {}
    for spec in specs:
        if roles[spec.name] == "batch0":
            layouts[spec.name] = sample_layout(path, keys[spec.name], arrays[spec.name].shape, spec)
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
            ax, sample = inner_layout(path, key, shape, spec, n, is_batched)
            layouts[spec.name], axes[spec.name] = (is_batched, n, sample), ax
    return DataFile(path, kind, n, is_batched, arrays, tuple(layouts[s.name][2] for s in specs),
                     tuple(axes[s.name] for s in specs))


def _static(d) -> bool:
    return isinstance(d, int) and d > 0


def input_roles(specs: list[TensorSpec]) -> dict[str, str]:
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


def inner_layout(path: str, key: str, shape: tuple[int, ...], spec: TensorSpec, n: int,
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


def index_image_file(path: str, plan: ImagePlan) -> DataFile:
    verify_image(path)
    return DataFile(path, "image", 1, False, {}, (plan.sample_shape,))


def list_files(path: str, labels_path: str | None, follow_symlinks: bool = False) -> list[tuple[str, str]]:
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
            if name.startswith(".") or os.path.isdir(full) or name == LABELS_FILE or os.path.abspath(full) in skip \
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


class Reader:
    """Holds at most one open file: memory maps for .npy / stored .npz, decoded arrays otherwise."""

    def __init__(self, files: list[DataFile], specs: list[TensorSpec], plan: ImagePlan | None):
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

    def _open(self, f: DataFile) -> dict[str, np.ndarray]:
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


def convert(data: np.ndarray, spec: TensorSpec, path: str) -> np.ndarray:
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
