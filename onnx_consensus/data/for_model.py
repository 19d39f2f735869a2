"""Data for one model, as a run needs it: the calibration data (a path loaded with the run's DataOptions, or
CalibrationData as given), bfloat16 inputs cast to float32 for the model's float32 shadow, and the training /
evaluation data loaded with the calibration data's image options."""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .batches import Batches
from .calibration import CalibrationData, load_calibration
from .images import ImageOptions

if TYPE_CHECKING:
    from ..options import DataOptions

__all__ = ["Float32Batches", "calibration_for", "image_options", "extra_data_for"]


class Float32Batches:
    """Calibration data loaded for a bfloat16 model, feeding its float32 shadow (``Batches``): the samples,
    labels and split of ``data`` (a CalibrationData), its bfloat16 arrays cast to float32 as they are read."""

    def __init__(self, data: Batches):
        self.data = data

    @property
    def n_samples(self) -> int:
        return self.data.n_samples

    @property
    def labels(self) -> np.ndarray | None:
        return self.data.labels

    @property
    def source(self) -> str | None:
        return self.data.source

    @property
    def fixed_batch(self) -> int | None:
        return self.data.fixed_batch

    @property
    def batch_axes(self) -> dict[str, int | None]:
        return self.data.batch_axes

    def __len__(self) -> int:
        return self.n_samples

    def batches(self, batch_size: int, indices: Sequence[int] | None = None) -> Iterator[dict[str, np.ndarray]]:
        for feeds, _ in self.counted_batches(batch_size, indices):
            yield feeds

    def counted_batches(self, batch_size: int,
                        indices: Sequence[int] | None = None) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        for feeds, n in self.data.counted_batches(batch_size, indices):
            yield {k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in feeds.items()}, n

    def split(self, holdout_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        return self.data.split(holdout_fraction, seed)

    def labels_for(self, indices) -> np.ndarray | None:
        return self.data.labels_for(indices)


def calibration_for(data, model: onnx.ModelProto, opts: DataOptions):
    """``data`` as CalibrationData for ``model`` as given (loaded when a path, with ``opts``); data for
    bfloat16 inputs is cast to float32 for the shadow, the same whether the API or the command loaded it."""
    if isinstance(data, (str, os.PathLike)):
        data = load_calibration(data, model, labels=opts.labels, image_options=image_options(opts),
                                strict=opts.strict, max_samples=opts.max_samples,
                                follow_symlinks=opts.follow_symlinks)
    if isinstance(data, CalibrationData) and any(getattr(s.dtype, "name", str(s.dtype)) == "bfloat16"
                                                 for s in data.specs):
        return Float32Batches(data)
    return data


def image_options(opts: DataOptions) -> ImageOptions:
    kw = {"layout": opts.layout}
    if opts.image_size:
        kw["size"] = opts.image_size
    if opts.mean:
        kw["mean"] = opts.mean
    if opts.std:
        kw["std"] = opts.std
    return ImageOptions(**kw)


def extra_data_for(path, model: onnx.ModelProto, opts: DataOptions):
    """Training / evaluation data: a path (loaded with ``opts.strict`` and the image options of the
    calibration data, for image folders) or CalibrationData."""
    if path is None or not isinstance(path, (str, os.PathLike)):
        return path
    return load_calibration(path, model, image_options=image_options(opts), strict=opts.strict,
                            follow_symlinks=opts.follow_symlinks)
