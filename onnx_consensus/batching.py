"""Where the samples are in a batch: the model's fixed batch size, padding a short batch up to it, and the
sample axis of a tensor computed from a batch (so every statistic counts samples, never rows).

A model whose inputs all have the same static size at dim 0 (1 in most zoo and Paddle exports, sometimes 2)
rejects any other batch: every inference then runs batches of exactly that size, the last one padded by
repeating its last sample (``pad_batch``), and the padded rows are dropped (``per_sample``) before any
statistic. Inputs without a batch (rank 0, e.g. a sample rate) are never padded; an input whose batch axis is
not 0 (a recurrent state (layers, B, hidden)) is padded along its own axis.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError

if TYPE_CHECKING:
    from .data.batches import Batches

__all__ = ["fixed_batch", "pad_batch", "sample_axis", "per_sample", "tile_feed", "calibration_shapes", "counted_batches"]


def fixed_batch(specs: Sequence) -> int | None:
    """The model's static batch size, or None when its batch is dynamic.

    specs: the model inputs (``graph.ir.TensorSpec``: ``shape`` a tuple of int / str / None, or None).
    Fixed when every input of rank >= 1 has the same static size > 0 at dim 0 (its batch axis); an input of
    unknown rank or a dynamic dim 0 makes the batch dynamic. Rank-0 inputs are ignored."""
    sizes = set()
    for s in specs:
        shape = s.shape
        if shape is None:
            return None
        if len(shape) == 0:
            continue
        d = shape[0]
        if not isinstance(d, int) or d <= 0:
            return None
        sizes.add(d)
    return sizes.pop() if len(sizes) == 1 else None


def pad_batch(feeds: Mapping[str, np.ndarray], size: int, axes: Mapping[str, int | None]) -> dict[str, np.ndarray]:
    """``feeds`` of n <= ``size`` samples padded to ``size`` by repeating the last sample along each input's
    batch axis (``axes[name]``; None: no batch axis, left as is). Feeds already of ``size`` come back as is."""
    out = {}
    for name, v in feeds.items():
        ax = axes.get(name, 0)
        if ax is None or v.ndim == 0 or v.shape[ax] == size:
            out[name] = v
            continue
        n = v.shape[ax]
        if n > size or n == 0:
            raise ValueError(f"cannot pad {name!r} of {n} samples to {size}")
        last = np.take(v, [n - 1], axis=ax)
        out[name] = np.concatenate([v] + [last] * (size - n), axis=ax)
    return out


def sample_axis(shape: Sequence[int], n_fed: int) -> int | None:
    """The axis of a tensor of ``shape`` that holds the ``n_fed`` samples of its batch: 0 when its size is
    ``n_fed``, else the first axis of that size (a time-major (T, B, C) output: 1); None when none has it."""
    if len(shape) and shape[0] == n_fed:
        return 0
    for k, d in enumerate(shape):
        if d == n_fed:
            return k
    return None


def per_sample(a: np.ndarray, n_fed: int, n_real: int | None = None, *, name: str = "tensor",
               strict: bool = True) -> np.ndarray:
    """``a`` (computed from a batch of ``n_fed`` samples) with its sample axis first, cut to the ``n_real``
    true samples (the rest is padding): (n_real, ...).

    The sample axis is ``sample_axis``; a tensor with no axis of size ``n_fed`` computed from one sample
    (e.g. (T x 1, D) rows of an LSTM output reshaped for a Gemm) is that one sample: (1, *a.shape). Raises
    InputError when the samples cannot be told apart (rows of several samples mixed in one axis), or with
    ``strict=False`` returns ``a`` as it is then (rows taken as they come, e.g. a detector's (num_dets, 6))."""
    a = np.asarray(a)
    n_real = n_fed if n_real is None else n_real
    ax = sample_axis(a.shape, n_fed) if a.ndim else None
    if ax is None:
        if n_fed != 1:
            if not strict:
                return a
            raise InputError(f"{name} has shape {tuple(a.shape)} for a batch of {n_fed} samples: no axis holds the "
                             "samples (rows of several samples mixed); rerun with --batch-size 1")
        return a[None]
    if ax:
        a = np.moveaxis(a, ax, 0)
    return a[:n_real] if n_real < n_fed else a


def tile_feed(sample: Mapping[str, np.ndarray], batch_size: int, axes: Mapping[str, int | None]) -> dict[str, np.ndarray]:
    """A feed of ``batch_size`` samples tiled from ``sample`` (one real batch) along each input's batch axis
    (``axes[name]``, default 0; None: the input has no batch axis and is fed as given)."""
    out = {}
    for k, v in sample.items():
        ax = axes.get(k, 0)
        if ax is None or np.ndim(v) == 0:
            out[k] = v
            continue
        n = v.shape[ax]
        reps = -(-batch_size // n)
        out[k] = np.take(np.concatenate([v] * reps, axis=ax), np.arange(batch_size), axis=ax)
    return out


def calibration_shapes(specs: Sequence, data: Batches) -> dict[str, tuple[int, ...]]:
    """{input name: shape} of the first calibration sample (the batch at 1, or the model's fixed batch) for
    counting MACs, when some input (``specs``) has a dynamic dim other than its batch axis; else {}.
    ``data``: ``data.batches.Batches``."""
    axes = data.batch_axes

    def dynamic(spec) -> bool:
        if spec.shape is None:
            return True
        ax = axes.get(spec.name, 0)
        return any(not (isinstance(d, int) and d > 0) for k, d in enumerate(spec.shape) if k != ax)
    if not any(dynamic(s) for s in specs):
        return {}
    feeds = next(iter(data.batches(1)), None)
    if feeds is None:
        return {}
    return {s.name: tuple(int(d) for d in np.shape(feeds[s.name])) for s in specs if s.name in feeds}


def counted_batches(data: Batches, batch_size: int, indices=None) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """(feeds, n_real) batches of ``data`` (``data.batches.Batches``): its ``counted_batches``."""
    yield from data.counted_batches(batch_size, indices)
