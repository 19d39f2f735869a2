"""Accuracy recovery after pruning: glue between calibration data, evaluation and the PyTorch bridge.

Supervised when the training data has labels; otherwise label-free distillation from the original model.
torch is optional: ``require_torch`` says in one line how to get it.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import onnx

from .batching import counted_batches
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
    """One epoch of (inputs by name, labels or None) batches over ``indices`` (default: every sample) in a
    seeded random order; len() is the number of batches (so the bridge can lay a cosine schedule over the
    run), ``n_samples`` the number of samples. A model with a fixed batch gets batches of that size; a short
    last batch is left out (padding would count its last sample twice)."""

    def __init__(self, data, batch_size: int, seed: int, indices=None):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.indices = np.arange(data.n_samples) if indices is None else np.asarray(indices, dtype=np.int64)

    @property
    def n_samples(self) -> int:
        return len(self.indices)

    def __len__(self) -> int:
        fixed = self.data.fixed_batch
        if fixed:  # a short (padded) last batch is dropped
            return max(self.n_samples // fixed, 1)
        return -(-self.n_samples // self.batch_size)

    def __iter__(self):
        perm = self.indices[np.random.default_rng(self.seed).permutation(self.n_samples)]
        fixed = self.data.fixed_batch
        offset = 0
        for feeds, n in counted_batches(self.data, self.batch_size, perm):
            labels = self.data.labels_for(perm[offset:offset + n])
            offset += n
            if fixed and n < fixed and self.n_samples >= fixed:
                continue  # a model with a fixed batch: train on full batches only, never on the padding
            if fixed and n < fixed and labels is not None:
                labels = np.concatenate([labels, np.repeat(labels[-1:], fixed - n)])
            yield feeds, labels


def training_batches(data, batch_size: int, seed: int = 0, indices=None) -> Callable[[], _Epoch]:
    """A factory of epochs over ``indices`` (default: every sample), reshuffled every epoch (seeded by
    ``seed`` and the epoch number)."""
    count = [0]

    def next_epoch() -> _Epoch:
        count[0] += 1
        return _Epoch(data, batch_size, seed * 1_000_003 + count[0], indices)
    return next_epoch


def _higher_is_better(f) -> float:
    """Accuracy with labels, else the fidelity's own measure (the task's: detections kept, top-1 agreement,
    cosine, ...; ``evaluate.Fidelity.measure``)."""
    if f.accuracy is not None:
        return f.accuracy
    name, value = f.measure
    return 1.0 - value if name == "relative error" else value


class Evaluator:
    """The bridge's eval_fn: ``evaluator(model)`` is top-1 accuracy when ``data`` has labels, else the
    fidelity to ``original`` in the task's terms (``evaluate.Fidelity.measure``: detections kept, top-1
    agreement, cosine, ...); higher is better (``metric`` names it). ``indices``: the samples of ``data`` evaluated (default: all of them).
    ``original_metric`` is the unpruned model's own value, from the reference outputs computed once here."""

    def __init__(self, original: onnx.ModelProto, data, *, batch_size: int = 64, threads: int | None = None,
                 indices=None, plan=None):
        self.data, self.batch_size, self.threads = data, batch_size, threads
        self._idx = np.arange(data.n_samples) if indices is None else np.asarray(indices, dtype=np.int64)
        self._labels = data.labels_for(self._idx)
        from .kinds import output_plan

        self._kinds = output_plan(original) if plan is None else plan  # how the outputs are judged
        self._reference = reference_outputs(original, data, self._idx, batch_size=batch_size, threads=threads,
                                            names=self._kinds.outputs)
        own = compare(self._reference, self._reference, self._labels, kinds=self._kinds)
        self.original_metric = _higher_is_better(own)
        self.metric = ("accuracy" if own.accuracy is not None else
                       own.measure[0] if own.measure[0] != "relative error" else "1 - relative error")

    @property
    def n_samples(self) -> int:
        return len(self._idx)

    def fidelity(self, model: onnx.ModelProto):
        """``model``'s evaluate.Fidelity against the original on these samples."""
        out = reference_outputs(model, self.data, self._idx, batch_size=self.batch_size, threads=self.threads,
                                names=self._kinds.outputs)
        return compare(out, self._reference, self._labels, kinds=self._kinds)

    def __call__(self, model: onnx.ModelProto) -> float:
        return _higher_is_better(self.fidelity(model))


def evaluator(original: onnx.ModelProto, data, *, batch_size: int = 64, threads: int | None = None,
              indices=None, plan=None) -> Evaluator:
    """An Evaluator of models against ``original`` on ``data`` (the samples ``indices``, default all), judging
    the outputs by ``plan`` (``kinds.output_plan``; default: from the graph)."""
    return Evaluator(original, data, batch_size=batch_size, threads=threads, indices=indices, plan=plan)


class Recovery(NamedTuple):
    """What ``finetune_pruned`` returns; the metrics are on the evaluation data (None without it)."""

    model: onnx.ModelProto
    result: object  # bridge.FinetuneResult; best_epoch 0 when the pruned model was kept
    before: float | None  # the pruned model
    after: float | None  # the returned model (the pruned one when no epoch beat it)
    original: float | None  # the unpruned model


def finetune_pruned(original: onnx.ModelProto, pruned: onnx.ModelProto, train_data, *, config,
                    eval_data=None, threads: int | None = None, progress: bool = True, dist=None,
                    eval_fn: Evaluator | None = None, train_indices=None, batch_size: int = 64) -> Recovery:
    """Fine-tune ``pruned`` on ``train_data`` (the samples ``train_indices``, default all), distilling from
    ``original`` when ``train_data`` has no labels.

    With ``eval_data`` (or a ready ``eval_fn``, e.g. an Evaluator on the hold-out) the returned model is the
    best of {the pruned model (epoch 0), each fine-tuned epoch} on it, the pruned one on ties: fine-tuning
    never returns a model worse than it was given on that data. Without either, the last epoch's.

    dist (``bridge.distributed.DistContext``, under torchrun): this process is one rank; it trains on its
    shard with ``config.batch_size // world_size`` samples per step (the global batch stays
    ``config.batch_size``), and only rank 0 evaluates (its metrics; None on the others)."""
    from .bridge import finetune

    main = dist is None or dist.is_main
    if not main:
        eval_fn = None
    elif eval_fn is None and eval_data is not None:
        eval_fn = evaluator(original, eval_data, threads=threads, batch_size=batch_size)
    before = eval_fn(pruned) if eval_fn else None
    teacher = None if train_data.labels is not None else original
    if dist is None:
        batches = training_batches(train_data, config.batch_size, config.seed, train_indices)
    else:
        from .bridge.distributed import sharded_batches

        batches = sharded_batches(train_data, config.batch_size // dist.world_size, dist, config.seed)
    extra = {} if dist is None else {"dist": dist}
    model, result = finetune(pruned, batches, teacher=teacher, config=config, eval_fn=eval_fn, progress=progress,
                             **extra)
    after = result.best_metric  # the bridge already evaluated the epoch it returns
    if eval_fn is not None and not (after is not None and after > before):
        log.info("no fine-tuned epoch beat the pruned model (%s %.4f vs best %s): keeping the pruned model",
                 eval_fn.metric, before, "n/a" if after is None else f"{after:.4f}")
        model, after, result.best_epoch = pruned, before, 0
    return Recovery(model, result, before, after, eval_fn.original_metric if eval_fn else None)


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
