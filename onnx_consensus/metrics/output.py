"""Output-level scores: the model's own outputs without a block vs the ORIGINAL model's outputs.

Unlike the representation metrics, these see what the user sees (the fixed head after the feature tensor is
not rotation- or scale-invariant). They are computed by the global scope from the suffix run to the graph
outputs, streamed batch by batch (``OutputAccumulator``), so no output array is kept per candidate.

Rows: a (N, C) output has one row per sample; a token output (N, T, C) one row per kept token (the attention
mask's, when there is one); any other output (N, ...) one flattened row per sample.
Class-score outputs: float (N, C) or (N, T, C) with C > 1. ``output_kl`` and ``output_agreement`` average
over those; ``output_mse`` and ``output_cosine`` over every float output. Several outputs: the mean over the
outputs each metric applies to.

- ``output_kl``: mean over rows of KL(softmax(ref) || softmax(out)) in nats (temperature 1).
- ``output_agreement``: share of rows whose top-1 class differs from the reference's (a disagreement rate).
- ``output_mse``: sum of squared errors / (number of values x variance of the reference's values): the MSE
  in units of the output's own scale (1.0 = as far off as predicting the output's mean).
- ``output_cosine``: mean over rows of 1 - cos(ref row, out row).
- ``output_fidelity``: the per-kind damage of the output plan (``kinds``), summed over its heads: (1 -
  detections kept) + top-confidence change for detectors, (1 - mask IoU) + mean map change for text maps,
  (1 - equal strings) + CER for CTC, KL for class scores, 1 - cosine for embeddings, the per-channel
  standardised error for other values, 1 - the user's --fidelity. The same measures as the budget, streamed
  (each candidate holds counts and per-channel sums, never arrays).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .registry import register_metric

OUTPUT_METRICS = ("output_kl", "output_agreement", "output_mse", "output_cosine", "output_fidelity")
CLASS_METRICS = ("output_kl", "output_agreement")
"""The output metrics that need class scores; the others apply to every float output."""


def is_class_scores(shape: tuple[int, ...], dtype=np.float32, *, sequence: bool = True) -> bool:
    """Whether an array of this (batch) shape can hold class scores: (N, C), or (N, T, C) with ``sequence``,
    C > 1; float unless ``dtype`` is None (not checked). The one shape test of class scores (the graph's is
    ``graph.heads.class_shape_ok``)."""
    return (dtype is None or np.dtype(dtype).kind == "f") and len(shape) in ((2, 3) if sequence else (2,)) \
        and shape[-1] > 1


CHUNK_VALUES = 1 << 20
"""``OutputAccumulator.add`` converts at most about this many values at a time to float64 (8 MB), so a
batch of large maps never has a float64 copy made whole."""


def output_rows(arr: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """The rows the output metrics average over, (rows, C) in the output's own float dtype (no float64 copy;
    other dtypes become float64): (N, C) as is; (N, T, C) the kept tokens (``keep``: (N, T) bool, None: all);
    other shapes flattened per sample."""
    a = np.asarray(arr)
    if a.dtype.kind != "f":
        a = a.astype(np.float64)
    if a.ndim == 3:
        return a[keep] if keep is not None else a.reshape(-1, a.shape[-1])
    if a.ndim == 2:
        return a
    return a.reshape(len(a), -1) if a.ndim > 0 else a.reshape(1, 1)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl_rows(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """(rows,) KL(softmax(ref_i) || softmax(out_i)) in nats; ref, out: (rows, C) logits."""
    lp, lq = _log_softmax(ref), _log_softmax(out)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=1), 0.0)


def disagreement_rows(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """(rows,) 1.0 where the top-1 class differs, else 0.0."""
    return (ref.argmax(axis=1) != out.argmax(axis=1)).astype(np.float64)


def cosine_rows(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """(rows,) 1 - cos(ref_i, out_i); 0 when both rows are zero, 1 when only one is."""
    nr, no = np.linalg.norm(ref, axis=1), np.linalg.norm(out, axis=1)
    denom = nr * no
    cos = np.divide(np.einsum("ij,ij->i", ref, out), denom, out=np.zeros_like(denom), where=denom > 0)
    cos[(nr == 0) & (no == 0)] = 1.0
    return 1.0 - np.clip(cos, -1.0, 1.0)


class OutputAccumulator:
    """Streamed output scores of one candidate: ``add`` each batch's (reference, candidate) rows per output,
    then ``scores()`` -> {metric: value}. Sums are kept per output, so a score is the mean over outputs."""

    def __init__(self, metrics: Iterable[str], plan=None):
        self.metrics = tuple(m for m in metrics if m in OUTPUT_METRICS)
        self._sums: dict[tuple[str, str], list[float]] = {}  # (metric, output) -> [numerator, count]
        self._moments: dict[str, list[float]] = {}  # output -> [sum, sum of squares, count] of ref values
        self._measures = []
        if "output_fidelity" in self.metrics:
            if plan is None:
                raise ValueError("output_fidelity needs the model's output plan (kinds.output_plan)")
            self._measures = plan.measures()

    def add_batch(self, ref: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
        """One batch of every output for ``output_fidelity``: {name: (samples, ...)} of the original and the
        candidate (padding dropped)."""
        for m in self._measures:
            m.add({o: ref[o] for o in m.head.outputs}, {o: out[o] for o in m.head.outputs})

    def add(self, output: str, ref: np.ndarray, out: np.ndarray, class_scores: bool) -> None:
        """One batch of one output: ref, out (rows, C) from ``output_rows``, summed in float64 a chunk of
        rows at a time (``CHUNK_VALUES``)."""
        if ref.shape != out.shape:
            raise ValueError(f"output {output}: reference rows {ref.shape} vs candidate rows {out.shape}")
        step = max(1, CHUNK_VALUES // max(1, int(np.prod(ref.shape[1:]))))
        for lo in range(0, len(ref), step):
            self._add(output, np.asarray(ref[lo:lo + step], np.float64), np.asarray(out[lo:lo + step], np.float64),
                      class_scores)

    def _add(self, output: str, ref: np.ndarray, out: np.ndarray, class_scores: bool) -> None:
        if len(ref) == 0:
            return
        for m in self.metrics:
            if m == "output_fidelity":
                continue
            if m in CLASS_METRICS and not class_scores:
                continue
            if m == "output_kl":
                num, cnt = kl_rows(ref, out).sum(), len(ref)
            elif m == "output_agreement":
                num, cnt = disagreement_rows(ref, out).sum(), len(ref)
            elif m == "output_cosine":
                num, cnt = cosine_rows(ref, out).sum(), len(ref)
            else:  # output_mse: normalised at the end by the reference's variance
                num, cnt = float(np.square(out - ref).sum()), ref.size
                mom = self._moments.setdefault(output, [0.0, 0.0, 0])
                mom[0] += float(ref.sum())
                mom[1] += float(np.square(ref).sum())
                mom[2] += ref.size
            acc = self._sums.setdefault((m, output), [0.0, 0])
            acc[0] += float(num)
            acc[1] += cnt

    def scores(self) -> dict[str, float]:
        """{metric: mean over the outputs it applies to}; a metric that applied to no output is absent."""
        per_metric: dict[str, list[float]] = {}
        for (m, output), (num, cnt) in self._sums.items():
            value = num / max(cnt, 1)
            if m == "output_mse":
                s, s2, n = self._moments[output]
                var = max(s2 / n - (s / n) ** 2, 0.0)
                value = value / var if var > 1e-30 else value
            per_metric.setdefault(m, []).append(value)
        out = {m: float(np.mean(v)) for m, v in per_metric.items()}
        if self._measures:
            results = [m.result() for m in self._measures]
            custom = [r for r in results if r.kind == "custom"]
            out["output_fidelity"] = float(sum(r.damage for r in (custom or results)))
        return out


def _score_arrays(name: str, X: np.ndarray, Y: np.ndarray) -> float:
    plan = None
    if name == "output_fidelity":
        from ..kinds import Head, OutputPlan

        plan = OutputPlan((Head("generic", ("output",)),))
    acc = OutputAccumulator([name], plan)
    acc.add("output", X, Y, class_scores=is_class_scores(X.shape, None, sequence=False))
    acc.add_batch({"output": X}, {"output": Y})
    got = acc.scores()
    if name not in got:
        from ..errors import InputError

        raise InputError(f"{name} needs class scores (n, C) with C > 1, got shape {X.shape}")
    return got[name]


# Registered for direct use on (n, C) arrays: X the original model's output, Y the candidate's. In a prune
# run the scorer streams them through OutputAccumulator instead (MetricSpec.output).
@register_metric("output_kl", output=True)
def output_kl(X: np.ndarray, Y: np.ndarray, labels=None, *, seed: int = 0) -> float:
    """Mean KL(softmax(X_i) || softmax(Y_i)) of class scores, original X vs without the block Y (nats)."""
    return _score_arrays("output_kl", X, Y)


@register_metric("output_agreement", output=True)
def output_agreement(X: np.ndarray, Y: np.ndarray, labels=None, *, seed: int = 0) -> float:
    """Top-1 disagreement rate of class scores, original X vs without the block Y (0 = same top-1 always)."""
    return _score_arrays("output_agreement", X, Y)


@register_metric("output_mse", output=True)
def output_mse(X: np.ndarray, Y: np.ndarray, labels=None, *, seed: int = 0) -> float:
    """MSE of the outputs, original X vs without the block Y, over the variance of X's values."""
    return _score_arrays("output_mse", X, Y)


@register_metric("output_cosine", output=True)
def output_cosine(X: np.ndarray, Y: np.ndarray, labels=None, *, seed: int = 0) -> float:
    """Mean 1 - cos of output rows, original X vs without the block Y."""
    return _score_arrays("output_cosine", X, Y)


@register_metric("output_fidelity", output=True)
def output_fidelity(X: np.ndarray, Y: np.ndarray, labels=None, *, seed: int = 0) -> float:
    """Per-kind damage of the outputs, original X vs without the block Y; on bare arrays the generic kind:
    the per-channel standardised error (``kinds.measures.ChannelMeasure``)."""
    return _score_arrays("output_fidelity", X, Y)
