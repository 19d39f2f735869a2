"""Fine-tuning a (pruned) ONNX model through the PyTorch bridge: one job for `prune --finetune-*`, the
``finetune`` command and decoder distillation.

Modules: ``checks`` (torch installed, options usable, the teacher; no torch import), ``epochs`` (the one source
of training batches, one process or a torchrun rank's shard; fixed-batch models), ``recipe`` (optimiser,
learning rate, device, mixed precision), ``train`` (the training loop), ``best`` (the best-of rule: the model
given vs each epoch), ``evaluator`` (the measure it is judged by), ``job`` (``tune``: measure, train, keep
the best; ``finetune_model`` for block models; ``guarded``: failure -> exit 4 / 130), ``results`` (the report
entries as dataclasses), ``after_prune`` (`prune --finetune-*`), ``between`` (`--finetune-between`),
``command`` (the ``finetune`` command: load, teacher, one process or torchrun, write), ``decoder`` (a decoder
LLM's distillation). torch is imported by ``recipe``, ``train`` and what runs them, never by this package's
import.
"""
from __future__ import annotations

from .checks import TORCH_HINT, check_config, require_torch

__all__ = ["TORCH_HINT", "check_config", "require_torch"]
