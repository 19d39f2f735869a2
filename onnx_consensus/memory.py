"""Peak memory of a prune run, estimated from the graph before any inference, and the batch that fits a budget.

Where a run's memory goes (measured on the DB text detector at 736x736, ``tools/bench/memory.py``):
- one onnxruntime run: the tensors alive at once along the graph's node order (``live_peak``), times the batch;
- the scorer's instrumented run keeps every candidate's cut tensor (its entry), the feature and the outputs
  of a batch while each candidate's suffix runs, one candidate at a time;
- per-batch output rows compared by the output metrics (reference, full model, candidate);
- batch-independent: the original model's outputs on the scoring and hold-out samples (the reference every
  round compares with), the pooled features, the calibration data read through its memory map, and the
  weights held by each candidate's suffix session (one shared copy past ``runtime.SHARE_WEIGHTS_BYTES``).
Sessions run without a memory arena (``runtime.session_options``), so a run's tensors are freed when it ends;
with one, every session would keep its own peak for its whole life.

Sizes: bytes. Activation sizes come from shape inference at the calibration data's shapes
(``graph.shapes.infer_shapes``); tensors whose shape stays unknown count 0 (``MemoryEstimate.unknown``).
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .errors import InputError
from .graph.shapes import infer_shapes
from .graph.weights import initializer_bytes
from .limits import BUDGET_SHARE, default_budget, format_size

if TYPE_CHECKING:
    from .data.batches import Batches

__all__ = ["MemoryEstimate", "estimate_memory", "fit_batch", "fit_memory", "parse_size", "current_rss", "live_peak"]

RUNTIME_FACTOR = 1.5
"""onnxruntime's own overhead on the activations the graph says are alive (layout copies of Conv inputs and
weights, NCHWc padding of channels, per-thread buffers), measured on the ResNet-56 and the text detector
(``tools/bench/memory.py``)."""
RUNTIME_BYTES = 100 * 2**20
"""What the process keeps once inference has started, whatever the model: onnxruntime's kernels and thread
pools, and the heap the allocator keeps after the first runs (measured: about 100 MB on the ResNet-56)."""
SESSION_BYTES = 4 * 2**20
"""One onnxruntime session's own structures (graph, kernels), besides its weights."""
OUTPUT_COPIES = 3
"""Output rows held per batch while scoring one candidate: the reference's, the full model's and the
candidate's (``scoring.outputs.BatchOutputs``)."""

_UNITS = {"": 2**30, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """'6G', '6GB', '512M', '1.5g' -> bytes (powers of 1024); a plain number is GB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise InputError(f"--max-memory must be a size such as 6G, 6GB or 512M, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def current_rss() -> int:
    """This process's resident set now, bytes (0 when /proc is not there)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _elem_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> bytes per element, from every value info of the main graph (default 4)."""
    out = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            try:
                out[vi.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)).itemsize
            except (KeyError, TypeError, ValueError):
                out[vi.name] = 4
    return out


def tensor_bytes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> tuple[dict[str, int], int]:
    """({tensor: bytes} of every main-graph tensor that shape inference sizes at ``input_shapes`` (every
    input's full shape), the number of node outputs left unsized)."""
    inferred = infer_shapes(model, {k: tuple(v) for k, v in input_shapes.items()}, 1,
                            enough=lambda m, shapes: all(_static(shapes.get(o)) for n in m.graph.node for o in n.output if o))
    elem = _elem_sizes(inferred.model)
    sizes, unknown = {}, 0
    weights = {i.name for i in model.graph.initializer}
    for name, shape in inferred.shapes.items():
        if name in weights:
            continue
        if _static(shape):
            sizes[name] = int(np.prod(shape, dtype=np.int64)) * elem.get(name, 4)
    for n in model.graph.node:
        unknown += sum(1 for o in n.output if o and o not in sizes)
    return sizes, unknown


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


def live_peak(nodes: Sequence[onnx.NodeProto], sizes: Mapping[str, int], inputs: Iterable[str],
              keep: Iterable[str] = ()) -> int:
    """The most bytes alive at once when ``nodes`` run in order: a tensor lives from its producer (or the start,
    for ``inputs``) to its last reader; ``keep`` tensors (graph outputs, exposed tensors) live to the end."""
    last: dict[str, int] = {}
    for k, n in enumerate(nodes):
        for i in n.input:
            if i:
                last[i] = k
    keep = set(keep)
    for t in keep:
        last[t] = len(nodes)
    alive = {t: sizes.get(t, 0) for t in inputs}
    now = peak = sum(alive.values())
    for k, n in enumerate(nodes):
        for o in n.output:
            if o and o not in alive:
                alive[o] = sizes.get(o, 0)
                now += alive[o]
        peak = max(peak, now)
        for i in set(n.input) | set(n.output):
            if i in alive and last.get(i, -1) <= k:
                now -= alive.pop(i)
    return peak


@dataclass
class MemoryEstimate:
    """A prune run's peak resident memory as ``base + fixed + batch * per_sample`` bytes.

    base: the process before any inference (measured, ``current_rss``); fixed: what does not depend on the
    batch (weights held by the sessions, reference outputs, pooled features, calibration data read);
    per_sample: one sample of a batch (activations alive in a run, cut tensors held, output rows).
    unknown: tensors shape inference could not size (counted 0)."""

    base: int
    fixed: int
    per_sample: int
    unknown: int = 0

    def peak(self, batch: int) -> int:
        return self.base + self.fixed + int(batch) * self.per_sample


def estimate_memory(model: onnx.ModelProto, sample_shapes: Mapping[str, Sequence[int]], *, rows: int = 1,
                    cut: Sequence[str] = (), n_candidates: int = 0, n_score: int = 0, n_holdout: int = 0,
                    data_bytes: int = 0, base: int | None = None, shared_weights: bool | None = None) -> MemoryEstimate:
    """The peak of a prune run on ``model`` (``MemoryEstimate``), from its graph alone.

    sample_shapes: every input's full shape in one calibration batch of ``rows`` samples (1, or the model's
    fixed batch); cut: the tensors the scorer keeps from its instrumented run (every candidate's entry);
    n_candidates: suffix sessions alive; n_score / n_holdout: samples whose reference outputs are kept;
    data_bytes: the calibration data's size (read through a memory map, so it becomes resident);
    base: bytes resident now (default ``current_rss``); shared_weights: whether the suffix sessions share
    one copy of the weights (default: past ``runtime.SHARE_WEIGHTS_BYTES``, as the scorer decides)."""
    from .runtime import SHARE_WEIGHTS_BYTES

    sizes, unknown = tensor_bytes(model, sample_shapes)
    rows = max(int(rows), 1)
    g = model.graph
    weights = {i.name for i in g.initializer}
    inputs = [i.name for i in g.input if i.name not in weights]
    outputs = [o.name for o in g.output]
    out_bytes = sum(sizes.get(o, 0) for o in outputs)
    run_peak = live_peak(g.node, sizes, inputs, outputs)
    scoring_peak = live_peak(g.node, sizes, inputs, list(outputs) + list(cut))
    held_cut = sum(sizes.get(t, 0) for t in set(cut) | set(inputs) | set(outputs))
    # while a candidate's suffix runs: the instrumented run's tensors, the suffix's own (at most a full run's)
    per_batch = max(scoring_peak, held_cut + run_peak) * RUNTIME_FACTOR + OUTPUT_COPIES * out_bytes
    w = initializer_bytes(model)
    shared = w > SHARE_WEIGHTS_BYTES if shared_weights is None else shared_weights
    sessions = 2 + n_candidates  # the instrumented model, the reference / fidelity model, one suffix each
    # each session holds its weights twice at most (the initializers and the kernels' packed copies)
    sessions_weights = (2 * w if shared else 2 * w * sessions) + SESSION_BYTES * sessions + RUNTIME_BYTES
    held = (2 * n_holdout + n_score) * out_bytes / rows  # the references, and the pruned model's hold-out outputs
    fixed = int(sessions_weights + held + data_bytes)
    return MemoryEstimate(current_rss() if base is None else int(base), fixed, int(np.ceil(per_batch / rows)),
                          unknown)


def fit_batch(estimate: MemoryEstimate, budget: int, wanted: int) -> int | None:
    """The batch to run: ``wanted`` when its estimated peak fits ``budget``, else the largest power of two
    below it that fits; None when even batch 1 does not."""
    if estimate.peak(wanted) <= budget:
        return wanted
    b = 1 << max(int(wanted).bit_length() - 1, 0)
    while b >= 1:
        if b < wanted and estimate.peak(b) <= budget:
            return b
        b //= 2
    return None


def fit_memory(model: onnx.ModelProto, data: Batches, run, criterion) -> tuple[int, str | None, dict | None]:
    """The batch a prune run of ``model`` on ``data`` uses to stay within ``run.max_memory``
    bytes (None: ``default_budget``), a one-line note when it differs from ``run.batch_size``, and the
    report's record ({budget, batch, estimated_peak} in bytes; None when there is no budget). Estimated
    before any inference (``estimate_memory``; the data's first sample gives the shapes; ``run.holdout`` and
    ``criterion.seed`` the hold-out split, ``criterion.unit`` the candidates). Raises InputError when even
    batch 1 (or the model's fixed batch) does not fit."""
    from .graph.blocks import find_blocks

    batch_size = run.batch_size
    budget = run.max_memory if run.max_memory is not None else default_budget()
    if budget is None:
        return batch_size, None, None
    sample = next(iter(data.batches(1)), None)
    if sample is None:
        return batch_size, None, None
    holdout, seed, unit = run.holdout, criterion.seed, criterion.unit
    fixed = data.fixed_batch
    rows = fixed or 1
    n = data.n_samples
    n_hold = len(data.split(holdout, seed=seed)[1]) if n >= 10 and holdout > 0 else n
    blocks = find_blocks(model, macs_per_node={}, unit=unit).blocks
    est = estimate_memory(model, {k: np.shape(v) for k, v in sample.items()}, rows=rows,
                          cut=[b.entry for b in blocks], n_candidates=len(blocks), n_score=n - n_hold if n_hold < n else n,
                          n_holdout=n_hold, data_bytes=sum(np.asarray(v).nbytes for v in sample.values()) * n // rows)
    smallest = fixed or 1
    if est.peak(smallest) > budget:
        what = (f"--max-memory {format_size(budget)}" if run.max_memory is not None else
                f"the default budget {format_size(budget)} ({BUDGET_SHARE:.0%} of the available memory; --max-memory)")
        raise InputError(f"not enough memory: even batch {smallest} needs an estimated "
                         f"{format_size(est.peak(smallest))}, more than {what} (use fewer samples with --max-samples "
                         "or smaller inputs)")
    want = min(batch_size, n)  # a batch larger than the data runs at the data's size
    batch = want if fixed else fit_batch(est, budget, want)
    info = {"budget": budget, "batch": fixed or batch, "estimated_peak": est.peak(fixed or batch)}
    if batch == want:
        return batch_size, None, info
    return batch, (f"batch {batch_size} -> {batch} to fit {format_size(budget)} (estimated peak "
                   f"{format_size(est.peak(batch))}; --max-memory to change)"), info
