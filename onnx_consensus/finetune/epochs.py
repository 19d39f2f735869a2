"""Training epochs: the one source of fine-tuning batches, for one process and for every torchrun rank.

    batches = training_batches(train_data, batch_size=32, seed=0)            # one process
    batches = training_batches(train_data, batch_size=16, seed=0, dist=ctx)  # a rank: its shard, batch per rank
    for feeds, labels in batches():                                          # each call: the next epoch
        ...

Each epoch draws a seeded permutation of the training samples (``epoch_permutation``); a rank takes every
world_size-th entry of it (``shard_indices``), so N ranks with batch B take the same samples per step as one
process with batch N*B. A model with a fixed batch gets batches of exactly that size and never trains on
padding (``Epoch``). Decoder windows have their own small epoch (``window_epochs``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from ..batching import counted_batches
from ..errors import InputError

__all__ = ["Epoch", "epoch_permutation", "shard_indices", "training_batches", "window_epochs"]


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded order of n training samples in ``epoch`` (1-based): (n,) int64."""
    return np.random.default_rng(seed * 1_000_003 + epoch).permutation(n)


def shard_indices(n: int, rank: int, world_size: int, *, seed: int, epoch: int,
                  drop_last: bool = False) -> np.ndarray:
    """This rank's sample indices for one epoch, (ceil(n / world_size),) int64 (floor with drop_last).

    Like torch's DistributedSampler: the epoch's seeded permutation (``epoch_permutation``) is padded
    by repeating its head to a multiple of world_size (or cut to one with ``drop_last``) and rank r takes
    every world_size-th entry starting at r, so all shards have the same size and together cover every
    sample (a few twice when padded). Taken in order, batch k of B samples on every rank together form
    entries [k*B*world_size, (k+1)*B*world_size) of the padded permutation. world_size 1: the permutation.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"rank {rank} is not in a world of {world_size} process(es)")
    if n < world_size:
        raise InputError(f"{n} training sample(s) cannot be shared among {world_size} processes")
    perm = epoch_permutation(n, seed, epoch)
    if drop_last:
        perm = perm[: n - n % world_size]
    else:
        pad = -n % world_size
        perm = np.concatenate([perm, perm[:pad]])
    return perm[rank::world_size]


class Epoch:
    """One epoch of (inputs by name, labels (B,) int64 or None) batches of ``data`` over ``order`` (sample
    indices, in the order trained); len() is the number of batches (the training loop lays its cosine schedule
    over it), ``n_samples`` the training samples of the epoch over all ranks (BatchNormalization's
    freeze-or-update rule counts them). A model with a fixed batch (``data.fixed_batch``) gets batches of that
    size; a short last batch is left out (padding would count its last sample twice) unless it is the only one,
    whose labels are then padded like its inputs."""

    def __init__(self, data, order: np.ndarray, batch_size: int, n_samples: int | None = None):
        self.data, self.order, self.batch_size = data, np.asarray(order, dtype=np.int64), batch_size
        self.n_samples = len(self.order) if n_samples is None else n_samples
        self.fixed = data.fixed_batch

    def __len__(self) -> int:
        if self.fixed:  # a short (padded) last batch is dropped
            return max(len(self.order) // self.fixed, 1)
        return -(-len(self.order) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        fixed, offset = self.fixed, 0
        for feeds, n in counted_batches(self.data, self.batch_size, self.order):
            labels = self.data.labels_for(self.order[offset:offset + n])
            offset += n
            if fixed and n < fixed:  # a model with a fixed batch: train on full batches, never on padding
                if len(self.order) >= fixed:
                    continue
                if labels is not None:
                    labels = np.concatenate([labels, np.repeat(labels[-1:], fixed - n)])
            yield feeds, labels


def training_batches(data, batch_size: int, seed: int = 0, indices=None, *, dist=None,
                     drop_last: bool = False) -> Callable[[], Epoch]:
    """A factory of epochs over ``indices`` of ``data`` (default: every sample; a CalibrationData or any object
    with ``n_samples``, ``batches``/``counted_batches`` and ``labels_for``), reshuffled every epoch (seeded by
    ``seed`` and the epoch number). ``dist`` (a ``bridge.distributed.DistContext``): this rank's shard
    (``shard_indices``), ``batch_size`` per rank; only the shard's samples are read."""
    base = np.arange(data.n_samples) if indices is None else np.asarray(indices, dtype=np.int64)
    rank, world = (0, 1) if dist is None else (dist.rank, dist.world_size)
    count = [0]

    def next_epoch() -> Epoch:
        count[0] += 1
        order = base[shard_indices(len(base), rank, world, seed=seed, epoch=count[0], drop_last=drop_last)]
        return Epoch(data, order, batch_size, n_samples=len(base))
    return next_epoch


def window_epochs(windows: np.ndarray, batch_size: int, seed: int,
                  feed: Callable[[np.ndarray], dict[str, np.ndarray]]) -> Callable[[], "WindowEpoch"]:
    """A factory of epochs over decoder token windows (n, seq) int64: batches of ``batch_size`` windows in a
    seeded order (one generator for the run), each fed as ``feed(windows[sorted batch])``, no labels."""
    rng = np.random.default_rng(seed)
    return lambda: WindowEpoch(windows, batch_size, rng, feed)


class WindowEpoch:
    """One epoch of ``window_epochs``: (feeds, None) batches; len() batches."""

    def __init__(self, windows: np.ndarray, batch_size: int, rng: np.random.Generator, feed):
        self.windows, self.batch_size, self.rng, self.feed = windows, batch_size, rng, feed

    def __len__(self) -> int:
        return (len(self.windows) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        order = self.rng.permutation(len(self.windows))
        for s in range(0, len(order), self.batch_size):
            yield self.feed(self.windows[np.sort(order[s:s + self.batch_size])]), None
