"""`--finetune-between N`: a few optimiser steps of fine-tuning after each removal of the schedule."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import onnx

from .epochs import training_batches

__all__ = ["between_removals"]


def between_removals(original: onnx.ModelProto, train_data, *, config, steps: int) -> Callable[[onnx.ModelProto], onnx.ModelProto]:
    """A hook for ``prune(between=...)``: ``steps`` optimiser steps of fine-tuning after each removal
    (supervised with labels, else distillation from ``original``), no evaluation, no progress bar."""
    from . import train

    short = replace(config, epochs=1, max_steps=steps)
    teacher = None if train_data.labels is not None else original
    batches = training_batches(train_data, config.batch_size, config.seed + 7919)

    def hook(model: onnx.ModelProto) -> onnx.ModelProto:
        tuned, _ = train.finetune(model, batches, teacher=teacher, config=short, eval_fn=None, progress=False)
        return tuned
    return hook
