"""Accuracy recovery after pruning: glue between calibration data, evaluation and the PyTorch bridge.

Supervised when the training data has labels; otherwise label-free distillation from the original model.
torch is optional: ``require_torch`` says in one line how to get it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx

from .errors import InputError
from .evaluate import compare, reference_outputs

log = logging.getLogger("onnx_consensus")
TORCH_HINT = "fine-tuning needs PyTorch: pip install 'onnx-consensus[torch]' (CPU build: pip install torch==2.13.0)"


def require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise InputError(TORCH_HINT) from None


class _Epoch:
    """One epoch of (inputs by name, labels or None) batches in a seeded random order; len() is the
    number of batches (so the bridge can lay a cosine schedule over the run)."""

    def __init__(self, data, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed

    def __len__(self) -> int:
        return -(-self.data.n_samples // self.batch_size)

    def __iter__(self):
        perm = np.random.default_rng(self.seed).permutation(self.data.n_samples)
        offset = 0
        for feeds in self.data.batches(self.batch_size, perm):
            n = len(next(iter(feeds.values())))
            labels = self.data.labels_for(perm[offset:offset + n])
            offset += n
            yield feeds, labels


def training_batches(data, batch_size: int, seed: int = 0) -> Callable[[], _Epoch]:
    """A factory of epochs, reshuffled every epoch (seeded by ``seed`` and the epoch number)."""
    count = [0]

    def next_epoch() -> _Epoch:
        count[0] += 1
        return _Epoch(data, batch_size, seed * 1_000_003 + count[0])
    return next_epoch


def evaluator(original: onnx.ModelProto, data, *, batch_size: int = 64,
              threads: int | None = None) -> Callable[[onnx.ModelProto], float]:
    """eval_fn for the bridge: top-1 accuracy when ``data`` has labels, else top-1 agreement with the
    original model (or 1 - mean relative error for non-classifiers). Higher is better."""
    idx = np.arange(data.n_samples)
    reference = reference_outputs(original, data, idx, batch_size=batch_size, threads=threads)

    def evaluate(model: onnx.ModelProto) -> float:
        out = reference_outputs(model, data, idx, batch_size=batch_size, threads=threads)
        f = compare(out, reference, data.labels)
        if f.accuracy is not None:
            return f.accuracy
        return f.agreement if f.agreement is not None else 1.0 - f.rel_error
    return evaluate


def finetune_pruned(original: onnx.ModelProto, pruned: onnx.ModelProto, train_data, *, config,
                    eval_data=None, threads: int | None = None, progress: bool = True):
    """Fine-tune ``pruned`` on ``train_data``: (model, FinetuneResult, metric before, metric after), the
    metrics on ``eval_data`` (None without it). Distils from ``original`` when ``train_data`` has no labels."""
    from .bridge import finetune

    eval_fn = evaluator(original, eval_data, threads=threads) if eval_data is not None else None
    before = eval_fn(pruned) if eval_fn else None
    teacher = None if train_data.labels is not None else original
    model, result = finetune(pruned, training_batches(train_data, config.batch_size, config.seed),
                             teacher=teacher, config=config, eval_fn=eval_fn, progress=progress)
    after = eval_fn(model) if eval_fn else None
    return model, result, before, after


def between_removals(original: onnx.ModelProto, train_data, *, config, steps: int) -> Callable[[onnx.ModelProto], onnx.ModelProto]:
    """A hook for ``prune(between=...)``: ``steps`` optimiser steps of fine-tuning after each removal
    (supervised with labels, else distillation from ``original``), no evaluation, no progress bar."""
    from dataclasses import replace

    from .bridge import finetune

    short = replace(config, epochs=1, max_steps=steps)
    teacher = None if train_data.labels is not None else original
    batches = training_batches(train_data, config.batch_size, config.seed + 7919)

    def hook(model: onnx.ModelProto) -> onnx.ModelProto:
        tuned, _ = finetune(model, batches, teacher=teacher, config=short, eval_fn=None, progress=False)
        return tuned
    return hook
