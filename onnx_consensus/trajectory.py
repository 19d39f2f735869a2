"""The removal curve for the HTML report: after each removal of the run, in order, the pruned model's MACs,
hold-out fidelity to the original (``evaluate.fidelity``, in the output's own terms), accuracy when labels
are given, and latency measured beside the original (``latency_model.round_times``, batch 1 or the model's
fixed batch, the latency model's statistic). Point 0 is the original.

The curve is rebuilt from the original model and the removal order (``remove_blocks(original, first k)``),
so it describes the pruned models before any fine-tuning.
"""
from __future__ import annotations

import os

import numpy as np
import onnx

from .evaluate import fidelity, reference_outputs
from .graph.flops import count_cost
from .kinds.outputs import output_kinds
from .graph.surgery import remove_blocks
from .latency_model import QUANTILE, RUNS, round_times

__all__ = ["removal_curve", "run_curve"]


def removal_curve(original: onnx.ModelProto, blocks, data, holdout_indices, *, labels=None, batch_size: int = 64,
                  threads: int | None = None, task: str | None = None, input_shapes: dict | None = None,
                  latency: bool = True, fixed: int | None = None, runs: int = RUNS) -> list[dict]:
    """One point per prefix of ``blocks`` (the removed Blocks, in removal order), the empty prefix first:
    {removed: k, id: the k-th block's id (None for k=0), macs, measure: (name, value) of ``Fidelity.measure``,
    fidelity (``Fidelity.to_json``), accuracy, latency_ms (None without ``latency``)}."""
    kinds = output_kinds(original, task) or None
    hold = np.asarray(holdout_indices)
    reference = reference_outputs(original, data, hold, batch_size=batch_size, threads=threads,
                                  names=list(kinds) if kinds else None)
    hold_labels = None if labels is None else np.asarray(labels)[hold]
    feed = None
    if latency:
        from .bench import random_feed

        feed = random_feed(original, fixed or 1, next(data.batches(1, hold)), axes=data.batch_axes)
    points = []
    for k in range(len(blocks) + 1):
        model = remove_blocks(original, blocks[:k]) if k else original
        fid = fidelity(model, reference, data, hold, labels=hold_labels, batch_size=batch_size, threads=threads,
                       kinds=kinds)
        ms = None
        if feed is not None:
            t = round_times([original, model] if k else [original], feed, runs, threads or os.cpu_count())
            ms = float(np.percentile(t[-1], QUANTILE))
        points.append({"removed": k, "id": blocks[k - 1].id if k else None,
                       "macs": count_cost(model, input_shapes or None).total_macs, "measure": list(fid.measure),
                       "fidelity": fid.to_json(), "accuracy": fid.accuracy, "latency_ms": ms})
    return points


def run_curve(model: onnx.ModelProto, result, data, options, *, fixed: int | None = None) -> list[dict]:
    """``removal_curve`` of a prune run: ``result`` (PruneResult) removals on its hold-out, with ``options``
    (the run's Options: batch, threads, task, shapes, whether latency is measured)."""
    run = options.run
    return removal_curve(model, [r.block for r in result.removals], data, result.holdout_indices,
                         labels=data.labels, batch_size=run.batch_size, threads=run.threads,
                         task=options.criterion.task, input_shapes=run.input_shapes,
                         latency=options.output.latency, fixed=fixed)
