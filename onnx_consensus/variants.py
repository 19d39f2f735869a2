"""The four models of a ``--quantize`` run, measured side by side in the same run: the original, the original
quantized, the pruned model (fine-tuned when asked) and the pruned model quantized (the one written).

Each row: fidelity to the original on the hold-out (or the ``--eval`` data) in the output's own terms
(``evaluate.fidelity``: top-1 agreement for class scores, cosine otherwise), accuracy when labels are given, MACs (a quantized model has
its float source's MACs: quantization changes precision, not the count), bytes of the serialized model (its
size on disk as one file) and onnxruntime latency p50 in ms at batch 1 and the run's batch, all four models
timed alternately on the same feed (``bench.measure_latency``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from .bench import measure_latency, random_feed
from .evaluate import Fidelity, fidelity, reference_outputs
from .graph.flops import count_cost
from .kinds.outputs import output_kinds
from .quantize import quantize

ROW_NAMES = ("original", "quantized", "pruned", "pruned + quantized")
"""The rows, in order; the last is the model ``--quantize`` writes."""


@dataclass
class VariantRow:
    """One row of the table: ``name`` (``ROW_NAMES``), its ``fidelity`` on the measured samples, MACs (None when
    unknown), ``bytes`` of the model as one file, ``latency_ms`` {batch: p50 ms}."""

    name: str
    fidelity: Fidelity
    macs: int | None
    bytes: int
    latency_ms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        """{name, fidelity (``Fidelity.to_json``), accuracy, macs, bytes, latency_ms}."""
        return {"name": self.name, "fidelity": self.fidelity.to_json(), "accuracy": self.fidelity.accuracy,
                "macs": self.macs, "bytes": self.bytes, "latency_ms": dict(self.latency_ms)}


@dataclass
class Variants:
    """The quantized pruned model to write and the table: ``rows`` (one ``VariantRow`` per ``ROW_NAMES``
    entry), ``format`` (int8 | int4 | fp16)."""

    model: onnx.ModelProto
    format: str
    rows: list[VariantRow] = field(default_factory=list)
    samples: int = 0

    def to_json(self) -> dict:
        return {"format": self.format, "written": ROW_NAMES[-1], "samples": self.samples,
                "rows": [r.to_json() for r in self.rows]}


def measure_variants(original: onnx.ModelProto, pruned: onnx.ModelProto, fmt: str, data, *, calib_indices,
                     holdout_indices, labels=None, batch_size: int = 64, threads: int | None = None,
                     task: str | None = None, input_shapes: dict | None = None, latency_batches=(1,),
                     latency_runs: int = 20, calib=None) -> Variants:
    """Quantize ``original`` and ``pruned`` to ``fmt`` (int8 calibrated on ``calib_indices`` of ``calib``,
    default ``data``) and measure the four rows on ``holdout_indices`` of ``data`` (``labels``: its labels).
    ``latency_batches``: the batch sizes timed (empty: none); inputs tiled from the first measured batch."""
    calib = data if calib is None else calib
    models = [original, quantize(original, fmt, calib, calib_indices), pruned,
              quantize(pruned, fmt, calib, calib_indices)]
    macs = [count_cost(m, input_shapes or None).total_macs for m in (original, pruned)]
    macs = [macs[0], macs[0], macs[1], macs[1]]
    kinds = output_kinds(original, task) or None
    reference = reference_outputs(original, data, holdout_indices, batch_size=batch_size, threads=threads,
                                  names=list(kinds) if kinds else None)
    hold_labels = None if labels is None else np.asarray(labels)[holdout_indices]
    rows = []
    for name, m, n_macs in zip(ROW_NAMES, models, macs):
        fid = fidelity(m, reference, data, holdout_indices, labels=hold_labels, batch_size=batch_size,
                       threads=threads, kinds=kinds)
        rows.append(VariantRow(name, fid, n_macs, m.ByteSize()))
    sample = next(data.batches(max(latency_batches), holdout_indices)) if latency_batches else None
    for bs in latency_batches:
        feed = random_feed(original, bs, sample, axes=data.batch_axes)
        lats = measure_latency(models, feed, runs=latency_runs, threads=threads or os.cpu_count())
        for row, lat in zip(rows, lats):
            row.latency_ms[str(bs)] = round(lat.median_ms, 4)
    return Variants(models[-1], fmt, rows, len(holdout_indices))


def table_lines(variants: dict) -> list[str]:
    """The four rows as aligned text lines, from ``Variants.to_json()`` (the report's ``quantize``)."""
    rows = variants["rows"]
    batches = list(rows[0]["latency_ms"]) if rows else []
    head = ["", "fidelity", "accuracy", "MACs", "bytes"] + [f"p50 b={b} (ms)" for b in batches]
    table = [head]
    for r in rows:
        fid = r["fidelity"]
        agree = fid.get("agreement")
        measure = f"agree {agree:.4f}" if agree is not None else f"cos {fid.get('cosine') or 0:.4f}"
        table.append([r["name"], measure, "" if r["accuracy"] is None else f"{r['accuracy']:.2%}",
                      "unknown" if r["macs"] is None else f"{r['macs']:,}", f"{r['bytes']:,}"]
                     + [f"{r['latency_ms'][b]:.2f}" for b in batches])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in table]


def quantize_run(model: onnx.ModelProto, result, data, options, *, fixed: int | None = None,
                 eval_data=None) -> tuple[onnx.ModelProto, dict]:
    """A prune run's ``--quantize`` step: (the pruned model quantized, the report's ``quantize``). The rows are
    measured on ``eval_data`` (``--eval``) when given, else on the run's hold-out; int8 is calibrated on the
    scoring samples. ``result``: the PruneResult (its model pruned and fine-tuned); ``options``: the Options."""
    run, out = options.run, options.output
    batches = [] if not out.latency else [fixed] if fixed else sorted({1, run.batch_size})
    score, hold = result.score_indices, result.holdout_indices
    if hold is None:  # no removable block: the schedule never split the data
        score = hold = np.arange(data.n_samples)
        if data.n_samples >= 10 and run.holdout > 0:
            score, hold = data.split(run.holdout, seed=options.criterion.seed)
    measured = data if eval_data is None else eval_data
    if eval_data is not None:
        hold = np.arange(eval_data.n_samples)
    v = measure_variants(model, result.model, out.quantize, measured, calib_indices=score, holdout_indices=hold,
                         labels=measured.labels, batch_size=run.batch_size, threads=run.threads,
                         task=options.criterion.task, input_shapes=run.input_shapes, latency_batches=batches,
                         latency_runs=out.latency_runs, calib=data)
    return v.model, v.to_json()
