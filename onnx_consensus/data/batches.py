"""``Batches``: what a run reads its samples through, whatever they are (calibration arrays and images, the same
cast to float32 for a bfloat16 model's shadow, a decoder's token windows).

Implemented by ``data.calibration.CalibrationData``, ``data.for_model.Float32Batches`` and
``llm.text.TextData``; the scorer, the evaluation, the memory estimate, the latency feeds and the fine-tuning
epochs read these attributes and nothing else of the data.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Batches"]


@runtime_checkable
class Batches(Protocol):
    """Samples read in batches. Attributes:

    n_samples: how many samples there are. labels: (n_samples,) int64 class ids, or None (text has none).
    source: the path the samples were read from (None when built in memory). fixed_batch: the model's static
    batch size when it has one (every batch then has exactly that many rows, a short one padded), else None.
    batch_axes: {input name: the axis of the batch in the fed arrays} (0 for most, None for a rank-0 input).
    """

    @property
    def n_samples(self) -> int: ...

    @property
    def labels(self) -> np.ndarray | None: ...

    @property
    def source(self) -> str | None: ...

    @property
    def fixed_batch(self) -> int | None: ...

    @property
    def batch_axes(self) -> dict[str, int | None]: ...

    def batches(self, batch_size: int, indices: Sequence[int] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """{input name: (B, ...) array} batches of the samples ``indices`` (default all), in that order."""

    def counted_batches(self, batch_size: int,
                        indices: Sequence[int] | None = None) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """``batches`` with the number of real (not padding) samples of each: (feeds, n_real)."""

    def split(self, holdout_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(score indices, hold-out indices): a seeded partition of the samples, each sorted, int64."""

    def labels_for(self, indices) -> np.ndarray | None:
        """(len(indices),) int64 labels of those samples, or None without labels."""
