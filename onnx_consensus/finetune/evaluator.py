"""The measure fine-tuning keeps the best model by: top-1 accuracy with labels, else the fidelity to the original
model in the outputs' terms (``evaluate.Fidelity.measure``: detections kept, top-1 agreement, cosine, ...), higher
better, on data training never saw (the ``--eval`` data or the hold-out).

    ev = evaluator(original, eval_data)     # the original's reference outputs computed once
    ev(pruned), ev.metric, ev.original_metric
"""
from __future__ import annotations

import numpy as np
import onnx

from ..evaluate import compare, reference_outputs

__all__ = ["Evaluator", "evaluator"]


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
        from ..kinds import output_plan

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
