"""The best-of rule every fine-tuning keeps (``prune --finetune-*``, the ``finetune`` command, decoder
distillation): the model returned is the best of {the model given (epoch 0), each fine-tuned epoch} by one
measure on data training never saw (the ``--eval`` data, the hold-out, held-out perplexity), higher better.
An epoch replaces the model kept only when it is strictly better, so the model given is kept when no epoch
beats it: fine-tuning never returns a model worse than it was given on that data. Without a measure
(``metric`` None), the last epoch's model is kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

__all__ = ["BestOf"]


@dataclass
class BestOf:
    """The model kept so far: ``epoch`` 0 is the model given (``metric`` its measure, None when not measured),
    k >= 1 the k-th epoch's."""

    model: onnx.ModelProto | None = None
    metric: float | None = None
    epoch: int = 0

    def offer(self, epoch: int, model: onnx.ModelProto, metric: float | None) -> bool:
        """Keep ``model`` (epoch ``epoch``, measured ``metric``) when it beats the model kept (or nothing is
        kept yet, or there is no measure). Returns whether it was kept."""
        better = self.model is None or metric is None or self.metric is None or metric > self.metric
        if better:
            self.model, self.metric, self.epoch = model, metric, epoch
        return better

    @property
    def improved(self) -> bool:
        """An epoch (not the model given) is kept."""
        return self.epoch > 0
