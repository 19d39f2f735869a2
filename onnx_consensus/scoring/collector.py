"""The pass over calibration data that scoring makes, as an object: ``FeatureCollector``.

Every model kind collects the same things for a round: per candidate, the feature rows of both sides (the
current model's feature and the feature without the candidate in the global scope; the candidate's entry and
exit in the local scope), the predicted classes the Gaussian metrics condition on, the output-level scores,
and the time spent in onnxruntime. What differs is how a batch is run and which rows are taken (pooled
samples for block models, ``scoring.blocks``; token rows for decoder layers, ``llm.scoring``): subclasses
implement ``setup`` and ``add_batch`` and call the ``add_*`` methods; ``finish`` assembles ``Features``.

Lifecycle: ``setup()`` once (sessions), ``add_batch(...)`` once per batch, ``finish()`` -> Features; the
driver ``collect`` does the three. Memory: a collector keeps only the feature rows (n x d per candidate) and
what its subclass keeps; a batch's activations live inside ``add_batch``.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..graph.masks import TokenMask

SCOPES = ("global", "local")


@dataclass
class Features:
    """Pooled features of one pass over the calibration data, one (X, Y) pair per candidate block.

    scope "global": ``before[b]`` is the current model's feature tensor (the same (n, d) array for every
    block), ``after[b]`` the feature of the model without block b. scope "local": ``before[b]`` is block b's
    entry, ``after[b]`` its exit, each (n, d_b). Rows are samples (tokens for decoder layers), float32 for
    block models (pooled by ``metrics.features.pool_features``), the model's dtype for decoder layers.
    predictions: (n,) predicted class of each row (argmax of the model's class scores), None when the model
    has none (``graph.heads.output_kinds``).
    feature: the feature tensor's name, comma-separated when several graph outputs (global scope), else
    None; feature_reason: why that feature (``graph.heads.choose_feature``). ort_seconds: time in onnxruntime.
    outputs: block id -> {output metric: score} (``metrics.output``), the graph outputs without the block vs
    the reference outputs (the original model's when given, else the current model's); empty when no output
    metric was asked for.
    """

    scope: str
    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]
    predictions: np.ndarray | None
    feature: str | None
    ort_seconds: float
    feature_reason: str | None = None
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)

    def pair(self, block_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(X, Y) for one block, each (n, d)."""
        return self.before[block_id], self.after[block_id]

    @property
    def n_samples(self) -> int:
        return len(next(iter(self.after.values()))) if self.after else 0


def token_keep(feeds: dict[str, np.ndarray], act: np.ndarray, masks: dict[str, TokenMask]) -> np.ndarray | None:
    """Which tokens of a token tensor ``act`` (N, T, D) to keep, (N, T) bool, from the first mask input
    (``graph.masks.token_masks``) whose fed value is a 0/1 or bool (N, T) array; None when there is none."""
    if act.ndim != 3:
        return None
    for name, mask in masks.items():
        value = feeds.get(name)
        if value is not None and np.ndim(value) == 2 and np.shape(value) == act.shape[:2]:
            keep = mask.keep(value)
            if keep is not None:
                return keep
    return None


class FeatureCollector:
    """One scoring pass over the calibration data, for the candidates ``ids`` in ``scope``.

    Subclasses: ``setup()`` builds their sessions; ``add_batch(...)`` runs one batch (through ``run``, which
    counts onnxruntime's time) and hands the rows over with ``add_before`` / ``add_after`` /
    ``add_predictions``; ``output_scores()`` gives the output-level scores when they collect some. Rows are
    kept per batch and concatenated once, in ``finish``, in the order they were added (batch order)."""

    def __init__(self, ids: Iterable[str], scope: str):
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}")
        self.ids = list(ids)
        self.scope = scope
        self.feature: str | None = None
        self.feature_reason: str | None = None
        self.ort_seconds = 0.0
        self._shared: list[np.ndarray] = []  # global scope: the current model's feature, one part per batch
        self._before: dict[str, list[np.ndarray]] = {i: [] for i in self.ids}  # local scope: entries
        self._after: dict[str, list[np.ndarray]] = {i: [] for i in self.ids}
        self._preds: list[np.ndarray | None] = []

    def setup(self) -> None:
        """Build what the pass needs (sessions); called once before the first batch."""

    def add_batch(self, *batch) -> None:
        raise NotImplementedError

    def output_scores(self) -> dict[str, dict[str, float]]:
        """Candidate id -> {output metric: score}; empty when no output metric was collected."""
        return {}

    def run(self, session, names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """``session.run(names, feeds)``, its time added to ``ort_seconds``."""
        t0 = time.perf_counter()
        out = session.run(names, feeds)
        self.ort_seconds += time.perf_counter() - t0
        return out

    def add_before(self, rows: np.ndarray, block_id: str | None = None) -> None:
        """One batch of the X side: the current model's feature (global scope, ``block_id`` None, shared by
        every candidate) or ``block_id``'s entry (local scope). rows: (n, d)."""
        (self._shared if block_id is None else self._before[block_id]).append(rows)

    def add_after(self, block_id: str, rows: np.ndarray) -> None:
        """One batch of the Y side of ``block_id``: (n, d) rows of the feature without it, or of its exit."""
        self._after[block_id].append(rows)

    def add_predictions(self, predicted: np.ndarray | None) -> None:
        """One batch of predicted classes (n,), None when the model has no class scores."""
        self._preds.append(predicted)

    def finish(self) -> Features:
        """The collected ``Features``: every candidate's rows concatenated over the batches."""
        cat = np.concatenate
        predictions = None if any(p is None for p in self._preds) else cat(self._preds)
        after = {k: cat(v) for k, v in self._after.items()}
        if self.scope == "global":
            x = cat(self._shared)
            before = {i: x for i in self.ids}
        else:
            before = {k: cat(v) for k, v in self._before.items()}
        return Features(self.scope, before, after, predictions, self.feature, self.ort_seconds,
                        self.feature_reason, self.output_scores())


def collect(collector: FeatureCollector, batches: Iterable[tuple]) -> Features:
    """Run ``collector`` over ``batches`` (each a tuple of ``add_batch``'s arguments): setup, every batch,
    finish."""
    collector.setup()
    for batch in batches:
        collector.add_batch(*batch)
    return collector.finish()
