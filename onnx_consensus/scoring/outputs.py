"""The graph outputs the output-level metrics compare (``metrics.output``): which ones, the original model's
on the scoring samples (the reference every round compares with), and one batch's rows of each.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from ..batching import per_sample
from ..errors import InputError
from ..evaluate import reference_outputs
from ..graph.blocks import Block
from ..kinds.basic import CLASS_SCORES
from ..kinds.outputs import output_kinds
from ..graph.ir import GraphIndex
from ..metrics.output import OutputAccumulator, output_rows
from .collector import token_keep


def float_outputs(model: onnx.ModelProto) -> list[str]:
    """Names of the graph's floating-point outputs, the ones the output metrics compare."""
    return list(output_kinds(model))


def has_class_scores(model: onnx.ModelProto, task: str | None = None) -> bool:
    """Whether a float graph output holds class scores (``graph.heads.output_kinds``)."""
    return CLASS_SCORES in output_kinds(model, task).values()


def original_outputs(model: onnx.ModelProto, data, indices=None, *, batch_size: int = 64,
                     threads: int | None = None) -> list[dict[str, np.ndarray]]:
    """The float graph outputs of ``model`` on ``data`` (the samples ``indices``), one {name: (samples, ...)}
    per batch of ``batching.counted_batches`` (padding dropped, sample axis first): the reference the output
    metrics compare with. Computed once per prune run on the original model, so every round is anchored to it."""
    return reference_outputs(model, data, indices, batch_size=batch_size, threads=threads,
                             names=float_outputs(model))


def dependent_outputs(index: GraphIndex | None, block: Block, outs: Sequence[str]) -> list[str]:
    """The graph outputs among ``outs`` downstream of ``block``'s exit (the others equal the full model's)."""
    if not outs:
        return []
    down = index.descendants(block.exit)
    return [o for o in outs if o in index.producer and id(index.producer[o]) in down]


class BatchOutputs:
    """One batch's reference rows per float output (samples first, padding dropped, the rows
    ``metrics.output.output_rows`` keeps: kept tokens of token outputs), made once per batch, and the full
    model's rows (for the outputs a candidate does not change), made when first needed. Outputs in
    ``as_log`` (probabilities) are compared as log-probabilities."""

    def __init__(self, ref, values, outs, feeds, masks, kinds, fed: int, n_real: int, as_log=frozenset()):
        self.fed, self.n_real = fed, n_real
        self.outs, self.full_rows, self.ref_arrays = list(outs), {}, ref
        self.keep, self.cls, self.log, self.ref, self.full = {}, {}, {}, {}, {}
        for o in self.outs:
            full = self.full[o] = self._samples(values[o], o)
            if ref[o].shape != full.shape:
                raise InputError(f"output {o}: reference shape {ref[o].shape} differs from the model's {full.shape}")
            keep = token_keep(feeds, values[o], masks)
            self.keep[o] = keep[:n_real] if keep is not None else None
            self.cls[o] = kinds.get(o) == CLASS_SCORES
            self.log[o] = self.cls[o] and o in as_log
            self.ref[o] = self._rows(ref[o], o)

    def _samples(self, a: np.ndarray, o: str) -> np.ndarray:
        return per_sample(a, self.fed, self.n_real, name=f"output {o!r}", strict=False)

    def _rows(self, a: np.ndarray, o: str) -> np.ndarray:
        r = output_rows(a, self.keep[o])
        return np.log(np.clip(r, 1e-30, None)) if self.log[o] else r

    def accumulate(self, acc: OutputAccumulator, got: dict[str, np.ndarray] | None) -> None:
        """Add one candidate's batch to ``acc``: its suffix's outputs ``got`` (None: the full model's)."""
        arrays = {}
        for o in self.outs:
            if got is not None and o in got:
                arr = self._samples(got[o], o)
                rows = self._rows(arr, o)
            else:
                if o not in self.full_rows:  # the full model's rows, made once per batch when first needed
                    self.full_rows[o] = self._rows(self.full[o], o)
                arr, rows = self.full[o], self.full_rows[o]
            acc.add(o, self.ref[o], rows, self.cls[o])
            arrays[o] = arr
        acc.add_batch(self.ref_arrays, arrays)  # every output at once, for the per-kind measures
