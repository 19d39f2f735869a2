"""Scoring candidate blocks on calibration data: activations from onnxruntime, scores from the metrics.

Two scopes:
- ``global`` (the published method): the feature tensor F of the current model vs F of the model without
  block b. The full model runs once per batch with every candidate's cut tensors exposed; then for each
  candidate only the suffix after its entry runs, fed the cached activations.
- ``local``: block b's entry vs its exit, from the one instrumented pass.
Memory is bounded by one batch of activations plus the pooled features (n_samples x d per candidate).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from .consensus import BlockScore, consensus
from .graph.blocks import Block, find_blocks
from .graph.instrument import expose, find_feature_tensor, suffix_model
from .graph.weights import initializer_bytes, weightless
from .metrics import DEFAULT_METRICS, get_metric, score
from .metrics.features import make_conditions, pca_cap, pool_features
from .runtime import SHARE_WEIGHTS_BYTES, SharedWeights, make_session

log = logging.getLogger("onnx_consensus")
SCOPES = ("global", "local")


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

    @property
    def order(self) -> list[str]:
        return [b.id for b in self.blocks]

    def to_json(self) -> dict:
        return {"scope": self.scope, "feature": self.feature, "metrics": list(self.metrics),
                "n_samples": self.n_samples, "ort_seconds": round(self.ort_seconds, 3),
                "metric_seconds": round(self.metric_seconds, 3), "order": self.order,
                "blocks": [b.to_json() for b in self.blocks]}


def _mask_for(feeds: dict[str, np.ndarray], act: np.ndarray) -> np.ndarray | None:
    """Which tokens to keep (N, T), from a mask input matching a token tensor (N, T, D), if there is one.

    An ``attention_mask``-style input (nonzero = keep, the Hugging Face convention) is used as is; an input
    whose name says padding (``padding_mask``, ``src_key_padding_mask``: nonzero = padding, torch's
    convention) is inverted."""
    if act.ndim != 3:
        return None
    for name, value in feeds.items():
        if "mask" in name.lower() and value.ndim == 2 and value.shape == act.shape[:2]:
            return value == 0 if "pad" in name.lower() else value
    return None


def _predictions(out: np.ndarray) -> np.ndarray | None:
    return np.argmax(out, axis=-1) if out.ndim == 2 and out.shape[1] > 1 else None


def collect_features(model: onnx.ModelProto, data, blocks: Sequence[Block], *, scope: str = "global",
                     feature: str | None = None, indices=None, batch_size: int = 64,
                     threads: int | None = None, progress: bool = False, share_weights: bool | None = None):
    """Run the calibration data once. Returns (X, Ys, predictions, feature, ort_seconds): for the global
    scope X is the (n, d) pooled feature of the current model and Ys[b] the feature without block b; for
    the local scope X and Ys are dicts of per-block entry / exit features. predictions: (n,) or None.
    share_weights: give every session one shared copy of the initializers (default: for models whose
    weights exceed runtime.SHARE_WEIGHTS_BYTES), so memory stays near one copy of the weights."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}")
    output0 = model.graph.output[0].name
    t_ort = 0.0
    shared = SharedWeights(model) if (share_weights if share_weights is not None
                                      else initializer_bytes(model) > SHARE_WEIGHTS_BYTES) else None

    def session(m: onnx.ModelProto, level: str):
        return shared.session(m, level=level, threads=threads) if shared else make_session(m, level=level, threads=threads)

    # With shared weights, all graph work happens on a weightless copy: suffix models cost no weights.
    graph_model = weightless(model) if shared else model
    try:
        sessions = {}
        if scope == "global":
            feature = feature or find_feature_tensor(graph_model)
            graph_inputs = {i.name for i in model.graph.input}
            cut: set[str] = set()
            for b in blocks:  # one suffix model at a time: only its session is kept
                s = suffix_model(graph_model, b, [feature])
                cut.update(s.inputs)
                if not s.passthrough:
                    sessions[b.id] = session(s.model, "all")
            needed = [feature, output0] + sorted(cut - graph_inputs)
        else:
            needed = [output0] + [n for b in blocks for n in (b.entry, b.exit)]
        full = session(expose(graph_model, needed), "basic")
    finally:
        if shared:
            shared.close()
    full_names = [o.name for o in full.get_outputs()]
    X: list | dict = [] if scope == "global" else {b.id: [] for b in blocks}
    Ys: dict[str, list] = {b.id: [] for b in blocks}
    preds: list = []
    batches = data.batches(batch_size, indices)
    if progress:
        from tqdm import tqdm

        total = len(indices) if indices is not None else data.n_samples
        batches = tqdm(batches, total=-(-total // batch_size), desc=f"scoring {len(blocks)} blocks", unit="batch", leave=False)
    for feeds in batches:
        t0 = time.perf_counter()
        values = dict(zip(full_names, full.run(None, feeds)))
        values.update(feeds)
        if scope == "global":
            outs = {bid: sess.run(None, {i.name: values[i.name] for i in sess.get_inputs()})[0]
                    for bid, sess in sessions.items()}
        t_ort += time.perf_counter() - t0
        p = _predictions(values[output0])
        preds.append(p)
        if scope == "global":
            X.append(pool_features(values[feature], _mask_for(feeds, values[feature])).astype(np.float32))
            for b in blocks:
                y = outs.get(b.id, values[feature])
                Ys[b.id].append(pool_features(y, _mask_for(feeds, y)).astype(np.float32))
        else:
            for b in blocks:
                X[b.id].append(pool_features(values[b.entry], _mask_for(feeds, values[b.entry])).astype(np.float32))
                Ys[b.id].append(pool_features(values[b.exit], _mask_for(feeds, values[b.exit])).astype(np.float32))
    cat = np.concatenate
    predictions = None if any(p is None for p in preds) else cat(preds)
    if scope == "global":
        return cat(X), {k: cat(v) for k, v in Ys.items()}, predictions, feature, t_ort
    return {k: cat(v) for k, v in X.items()}, {k: cat(v) for k, v in Ys.items()}, predictions, None, t_ort


def score_blocks(model: onnx.ModelProto, data, *, blocks: Sequence[Block] | None = None,
                 metrics: Sequence[str] = DEFAULT_METRICS, scope: str = "global", feature: str | None = None,
                 indices=None, labels: np.ndarray | None = None, batch_size: int = 64, seed: int = 0,
                 pca_dim: int = 256, threads: int | None = None, progress: bool = False) -> ScoreRound:
    """Score ``blocks`` (default: all removable blocks of ``model``) with each metric and order them by
    the Consensus. ``data`` is a CalibrationData; ``indices`` the samples to use (default all); ``labels``
    (n,) class ids for the Gaussian metrics' conditions (default: the model's predicted class)."""
    metrics = tuple(metrics)
    specs = [get_metric(m) for m in metrics]
    blocks = list(find_blocks(model).blocks if blocks is None else blocks)
    if not blocks:
        return ScoreRound(scope, feature, metrics, 0)
    X, Ys, predictions, feature, t_ort = collect_features(
        model, data, blocks, scope=scope, feature=feature, indices=indices, batch_size=batch_size,
        threads=threads, progress=progress)
    n = len(next(iter(Ys.values())))
    t0 = time.perf_counter()
    base = X if scope == "global" else None
    conditions = make_conditions(predictions, base if base is not None else X[blocks[0].id],
                                 labels=labels, seed=seed)
    table: dict[str, dict[str, float]] = {}
    with threadpool_limits(limits=1):  # small dense problems: one BLAS thread avoids spin-wait overhead
        for b in blocks:
            table[b.id] = _score_one(specs, base if base is not None else X[b.id], Ys[b.id], conditions,
                                     seed, pca_dim)
    ranked = consensus(table, {b.id: b.position for b in blocks}, metrics)
    return ScoreRound(scope, feature, metrics, n, ranked, t_ort, time.perf_counter() - t0)


def _score_one(specs, x: np.ndarray, y: np.ndarray, conditions, seed: int, pca_dim: int) -> dict[str, float]:
    """Every metric's score for one candidate: X, Y (n, d) features; the PCA cap is computed once."""
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
