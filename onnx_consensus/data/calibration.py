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
from typing import Iterator, Sequence

import numpy as np
import onnx

from ..batching import fixed_batch, pad_batch
from ..errors import InputError
from ..graph.ir import TensorSpec, interface
from .formats import Corrupt
from .images import ImageOptions, ImagePlan, image_plan, import_pil
from .index import (DATA_EXTENSIONS, LABELS_FILE, DataFile, Reader, confined_data_file, convert, index_array_file,
                    index_image_file, list_files)

log = logging.getLogger("onnx_consensus")



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
        files: list[DataFile],
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
        reader = Reader(self._files, self.specs, self._image_plan)
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

    def _assemble(self, fis: np.ndarray, rows: np.ndarray, reader: Reader) -> dict[str, np.ndarray]:
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
                    out[spec.name] = convert(np.asarray(src), spec, f.path)
                    continue
                if contiguous:
                    chunk = src[(slice(None),) * ax + (slice(int(r[0]), int(r[-1]) + 1),)]
                else:
                    chunk = np.take(src, r, axis=ax)
                converted = convert(chunk, spec, f.path)
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
    specs = _input_specs(model)
    if max_samples is not None and max_samples < 1:
        raise InputError(f"max_samples must be >= 1, got {max_samples}")
    if not os.path.exists(source):
        raise InputError(f"calibration data path does not exist: {source}")
    labels_path = labels
    if labels_path is None and os.path.isdir(source) and os.path.lexists(os.path.join(source, LABELS_FILE)):
        labels_path = confined_data_file(source, LABELS_FILE, follow_symlinks)

    listing = list_files(source, labels_path, follow_symlinks)
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
    files, skipped = _index_files(source, listing, specs, plan, strict)
    total = sum(f.n for f in files)
    label_arr = None if labels_path is None else _checked_labels(labels_path, total, skipped)
    n = total
    if max_samples is not None and max_samples < total:
        n = int(max_samples)
        files = _first_files(files, n)
        if label_arr is not None:
            label_arr = label_arr[:n]
    return CalibrationData(specs, files, n, label_arr, source, skipped, plan)


def _input_specs(model: onnx.ModelProto | str) -> list[TensorSpec]:
    """``model_input_specs`` of ``model`` (loaded without external data when a path); InputError when it has no
    input to feed, or only scalars."""
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
    return specs


def _index_files(source: str, listing: list[tuple[str, str]], specs: list[TensorSpec], plan: ImagePlan | None,
                 strict: bool) -> tuple[list[DataFile], list[str]]:
    """(the DataFiles holding samples, the paths skipped as unreadable) of ``listing`` [(path, kind)]; an
    unreadable file is an InputError with ``strict``; InputError when no file holds a sample."""
    files: list[DataFile] = []
    skipped: list[str] = []
    for fpath, kind in listing:
        try:
            f = index_image_file(fpath, plan) if kind == "image" else index_array_file(fpath, kind, specs)
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
    return files, skipped


def _checked_labels(labels_path: str, total: int, skipped: list[str]) -> np.ndarray:
    """The labels of ``labels_path``, one per sample of the ``total``; InputError when files were skipped
    (they could not be aligned) or the lengths differ."""
    label_arr = _load_labels(labels_path)
    if skipped:
        raise InputError(
            f"{labels_path}: labels cannot be aligned with the samples because {len(skipped)} file(s) were "
            f"skipped as unreadable (e.g. {skipped[0]}); fix or remove them"
        )
    if len(label_arr) != total:
        raise InputError(f"{labels_path}: {len(label_arr)} labels for {total} samples; lengths must match")
    return label_arr


def _first_files(files: list[DataFile], n: int) -> list[DataFile]:
    """The first files of ``files`` that hold the first ``n`` samples."""
    kept, count = [], 0
    for f in files:
        if count >= n:
            break
        kept.append(f)
        count += f.n
    return kept
