"""One scoring round: collected features -> a score per candidate and metric -> the Consensus order.

``score_table`` is the metric side, shared by block models (``score_blocks``) and decoder layers
(``llm.scoring.score_layers``); ``ScoreSettings`` groups how a round is collected and scored.
"""
from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from ..consensus import BlockScore, consensus
from ..errors import InputError
from ..graph.blocks import Block, find_blocks
from ..kinds import output_plan
from ..metrics import DEFAULT_METRICS, get_metric, resolve_metrics, score
from ..metrics.features import make_conditions, pca_cap
from ..metrics.registry import MetricSpec
from .blocks import collect_features
from .collector import Features
from .outputs import has_class_scores


@dataclass
class ScoreRound:
    """One scoring round: candidates in Consensus order (least important first) and where the time went."""

    scope: str
    feature: str | None
    metrics: tuple[str, ...]
    n_samples: int
    blocks: list[BlockScore] = field(default_factory=list)
    ort_seconds: float = 0.0
    metric_seconds: float = 0.0
    feature_reason: str | None = None

    @property
    def order(self) -> list[str]:
        return [b.id for b in self.blocks]

    def to_json(self) -> dict:
        return {"scope": self.scope, "feature": self.feature, "feature_reason": self.feature_reason,
                "metrics": list(self.metrics),
                "n_samples": self.n_samples, "ort_seconds": round(self.ort_seconds, 3),
                "metric_seconds": round(self.metric_seconds, 3), "order": self.order,
                "blocks": [b.to_json() for b in self.blocks]}


@dataclass(frozen=True)
class ScoreSettings:
    """How a round is collected and scored (every field as ``score_blocks`` documents it): scope, the global
    scope's feature tensor, task, token-mask overrides, seed, PCA cap of the alignment metrics, inference
    batch size, onnxruntime threads, progress bar. ``of`` builds it from a prune run's options."""

    scope: str = "global"
    feature: str | None = None
    task: str | None = None
    token_mask: tuple[str, ...] = ()
    seed: int = 0
    pca_dim: int = 256
    batch_size: int = 64
    threads: int | None = None
    progress: bool = False

    @classmethod
    def of(cls, criterion, run, token_mask: Sequence[str] | None = None) -> "ScoreSettings":
        """From ``options.CriterionOptions`` and ``options.RunOptions``; ``token_mask``: the resolved masks
        (default ``criterion.token_mask``)."""
        return cls(scope=criterion.scope, feature=criterion.feature, task=criterion.task,
                   token_mask=tuple(criterion.token_mask if token_mask is None else token_mask),
                   seed=criterion.seed, pca_dim=criterion.pca_dim, batch_size=run.batch_size,
                   threads=run.threads, progress=run.progress)

    def with_options(self, options: dict) -> "ScoreSettings":
        """These settings with the fields named in ``options`` replaced (an unknown name is a TypeError)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unexpected scoring option(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **options) if options else self


def metric_scores(specs: Sequence[MetricSpec], x: np.ndarray, y: np.ndarray, conditions, *, seed: int = 0,
                  pca_dim: int = 256) -> dict[str, float]:
    """Every representation metric's score for one candidate: X, Y (n, d) features (used in their own
    dtype); the PCA cap of the alignment metrics (``metrics.features.pca_cap``) is computed once."""
    capped = None
    out = {}
    for spec in specs:
        if spec.alignment:
            capped = capped or pca_cap(x, y, pca_dim)
            xs, ys = capped
        else:
            xs, ys = x, y
        out[spec.name] = score(spec.name, xs, ys, conditions, seed=seed)
    return out


def score_table(features: Features, specs: Sequence[MetricSpec], conditions, *, seed: int = 0,
                pca_dim: int = 256, dtype=None, workers: int | None = 1) -> dict[str, dict[str, float]]:
    """{candidate id: {metric: score}} for every candidate of ``features`` (in its order): the representation
    metrics among ``specs`` on each (X, Y) pair (cast to ``dtype`` when given), then the output-level ones
    from ``features.outputs``. conditions: (n,) condition ids (``metrics.features.make_conditions``).
    workers: candidates scored at once, in threads (None: one per core); each with one BLAS thread, so the
    scores are the same whatever the number. Raises InputError when an output-level metric found nothing to
    score (a class-score metric on a model without class scores)."""
    rep = [s for s in specs if not s.output]
    out_specs = [s for s in specs if s.output]
    for bid in features.after:
        got = features.outputs.get(bid, {})
        for s in out_specs:
            if s.name not in got:
                raise InputError(f"{s.name} needs a class-score output; this model has none: use output_mse / "
                                 "output_cosine (or --task classify if its first output is class scores)")

    def one(bid: str) -> dict[str, float]:
        x, y = features.pair(bid)
        if dtype is not None:
            x, y = x.astype(dtype), y.astype(dtype)
        row = metric_scores(rep, x, y, conditions, seed=seed, pca_dim=pca_dim) if rep else {}
        row.update({s.name: features.outputs[bid][s.name] for s in out_specs})
        return row

    ids = list(features.after)
    workers = min(len(ids), workers or os.cpu_count() or 1) if rep else 1
    with threadpool_limits(limits=1):  # small dense problems: one BLAS thread avoids spin-wait overhead
        if workers <= 1:
            return {bid: one(bid) for bid in ids}
        with ThreadPoolExecutor(workers) as pool:  # numpy's LAPACK calls release the GIL
            return dict(zip(ids, pool.map(one, ids)))


def score_blocks(model: onnx.ModelProto, data, *, blocks: Sequence[Block] | None = None,
                 metrics: Sequence[str] = DEFAULT_METRICS, weights: dict[str, float] | None = None,
                 settings: ScoreSettings | None = None, indices=None, labels: np.ndarray | None = None,
                 reference: list[dict[str, np.ndarray]] | None = None, plan=None, **options) -> ScoreRound:
    """Score ``blocks`` (default: all removable blocks of ``model``) with each metric and order them by
    the Consensus. ``data`` is a CalibrationData; ``indices`` the samples to use (default all); ``labels``
    (n,) class ids for the Gaussian metrics' conditions (default: the model's predicted class).
    ``metrics``: names or presets (``metrics.presets``: paper, output, a+b); ``weights``: the weighted rank
    sum's weights. ``reference``: for the output-level metrics, the ORIGINAL model's outputs
    (``original_outputs`` on the same ``indices`` and ``batch_size``); None compares with ``model``'s own
    outputs (the same in round 1). ``plan``: the output plan (``kinds.output_plan``; default: from the graph
    and ``task``), which the ``output`` preset and ``output_fidelity`` read.

    ``settings`` (``ScoreSettings``), each field also accepted as a keyword (``options``, overriding it):
    scope (global | local), feature (the global scope's tensor), task (classify | embed | generic, overriding
    the choice of the feature tensor, ``graph.heads.choose_feature``, and the kind of the first output),
    token_mask (overrides ``NAME:keep|pad``, ``graph.masks``), seed, pca_dim, batch_size, threads, progress."""
    st = (settings or ScoreSettings()).with_options(options)
    plan = output_plan(model, st.task) if plan is None else plan
    metrics = resolve_metrics(metrics, has_class_scores(model, st.task), plan)
    specs = [get_metric(m) for m in metrics]
    blocks = list(find_blocks(model).blocks if blocks is None else blocks)
    if not blocks:
        return ScoreRound(st.scope, st.feature, metrics, 0)
    feats = collect_features(model, data, blocks, scope=st.scope, feature=st.feature, indices=indices,
                             batch_size=st.batch_size, threads=st.threads, progress=st.progress,
                             token_mask=st.token_mask, task=st.task, output_metrics=[s.name for s in specs if s.output],
                             reference=reference, plan=plan)
    t0 = time.perf_counter()
    # conditions (classes or clusters) come from the model's feature (global) or the first block's entry
    conditions = make_conditions(feats.predictions, feats.before[blocks[0].id], labels=labels, seed=st.seed)
    table = score_table(feats, specs, conditions, seed=st.seed, pca_dim=st.pca_dim, workers=st.threads)
    ranked = consensus(table, {b.id: b.position for b in blocks}, metrics, weights)
    return ScoreRound(st.scope, feats.feature, metrics, feats.n_samples, ranked, feats.ort_seconds,
                      time.perf_counter() - t0, feats.feature_reason)
