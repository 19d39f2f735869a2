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

from .batching import counted_batches, per_sample
from .consensus import BlockScore, consensus
from .errors import InputError
from .evaluate import batch_rows
from .graph.blocks import Block, find_blocks
from .graph.heads import CLASS_SCORES, choose_feature, output_kinds, pool_output
from .graph.instrument import expose, suffix_model
from .graph.masks import TokenMask, token_masks
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


def _mask_for(feeds: dict[str, np.ndarray], act: np.ndarray, masks: dict[str, TokenMask]) -> np.ndarray | None:
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


@dataclass
class Features:
    """Pooled features of one pass over the calibration data, one (X, Y) pair per candidate block.

    scope "global": ``before[b]`` is the current model's feature tensor (the same (n, d) array for every
    block), ``after[b]`` the feature of the model without block b. scope "local": ``before[b]`` is block b's
    entry, ``after[b]`` its exit, each (n, d_b). Rows are samples, float32, pooled by ``pool_features``.
    predictions: (n,) argmax of the model's first output, None when it is not (n, classes) class scores
    (``graph.heads.output_kinds``).
    feature: the feature tensor's name, comma-separated when several graph outputs (global scope), else
    None; feature_reason: why that feature (``graph.heads.choose_feature``). ort_seconds: time in onnxruntime.
    """

    scope: str
    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]
    predictions: np.ndarray | None
    feature: str | None
    ort_seconds: float
    feature_reason: str | None = None

    def pair(self, block_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(X, Y) for one block, each (n, d)."""
        return self.before[block_id], self.after[block_id]

    @property
    def n_samples(self) -> int:
        return len(next(iter(self.after.values()))) if self.after else 0


def _predictions(out: np.ndarray) -> np.ndarray | None:
    return np.argmax(out, axis=-1) if out.ndim == 2 and out.shape[1] > 1 else None


def collect_features(model: onnx.ModelProto, data, blocks: Sequence[Block], *, scope: str = "global",
                     feature: str | None = None, indices=None, batch_size: int = 64,
                     threads: int | None = None, progress: bool = False, share_weights: bool | None = None,
                     token_mask: Sequence[str] = (), task: str | None = None) -> Features:
    """Run the calibration data once and return the pooled ``Features`` of every block in ``blocks``.

    The global scope's feature: ``feature`` when named, else ``graph.heads.choose_feature`` (the classifier
    head's input, or the graph's float outputs, pooled by ``graph.heads.pool_output`` and concatenated);
    ``task`` (classify | embed | generic) overrides that choice.

    Token tensors are averaged over the tokens a mask input keeps (``graph.masks.token_masks``;
    ``token_mask``: overrides ``NAME:keep|pad``). share_weights: give every session one shared copy of the
    initializers (default: for models whose weights exceed runtime.SHARE_WEIGHTS_BYTES), so memory stays
    near one copy of the weights."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}")
    masks = token_masks(model, token_mask)
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
        choice = None
        # the Gaussian metrics' conditions: the predicted class only when the first output is class scores
        classes = next(iter(output_kinds(graph_model, task).values()), None) == CLASS_SCORES
        if scope == "global":
            choice = choose_feature(graph_model, blocks, task=task, feature=feature)
            feats = list(choice.tensors)
            graph_inputs = {i.name for i in model.graph.input}
            cut: set[str] = set()
            for b in blocks:  # one suffix model at a time: only its session is kept
                s = suffix_model(graph_model, b, feats)
                cut.update(s.inputs)
                if not s.passthrough:
                    sessions[b.id] = session(s.model, "all")
            needed = list(dict.fromkeys(feats + [output0] + sorted(cut - graph_inputs)))
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
    batches = counted_batches(data, batch_size, indices)
    rows_of = batch_rows(data)
    if progress:
        from tqdm import tqdm

        total = len(indices) if indices is not None else data.n_samples
        step = getattr(data, "fixed_batch", None) or batch_size
        batches = tqdm(batches, total=-(-total // step), desc=f"scoring {len(blocks)} blocks", unit="batch", leave=False)

    def pool(act: np.ndarray, feeds: dict[str, np.ndarray], name: str) -> np.ndarray:
        """(n_real, d): the sample axis first (``batching.per_sample``), padding dropped, then pooled."""
        fed = rows_of(feeds)
        try:
            act = per_sample(act, fed, name=f"tensor {name!r}")
        except InputError as exc:  # rows of several samples mixed: taken as rows, as given
            if name not in mixed:
                mixed.add(name)
                log.warning("%s; its rows are scored as samples", exc)
            return pool_features(act, _mask_for(feeds, act, masks)).astype(np.float32)
        return pool_features(act, _mask_for(feeds, act, masks)).astype(np.float32)[:n_real]

    mixed: set[str] = set()

    def pool_feature(acts: Sequence[np.ndarray], feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The global feature: one tensor pooled as before, or graph outputs pooled and concatenated."""
        if choice.head or feature:
            return pool(acts[0], feeds, feats[0])
        fed, n_real = rows_of(feeds), n_now[0]
        parts = []
        for name, a in zip(feats, acts):
            a = per_sample(a, fed, n_real, name=f"output {name!r}", strict=False)
            parts.append(pool_output(a, _mask_for(feeds, a, masks)))
        return np.concatenate(parts, axis=1).astype(np.float32)

    n_now = [0]
    for feeds, n_real in batches:
        n_now[0] = n_real
        t0 = time.perf_counter()
        values = dict(zip(full_names, full.run(None, feeds)))
        values.update(feeds)
        if scope == "global":
            outs = {bid: sess.run(feats, {i.name: values[i.name] for i in sess.get_inputs()})
                    for bid, sess in sessions.items()}
        t_ort += time.perf_counter() - t0
        p = _predictions(per_sample(values[output0], rows_of(feeds), n_real, strict=False)) if classes else None
        preds.append(p)
        if scope == "global":
            X.append(pool_feature([values[f] for f in feats], feeds))
            for b in blocks:
                Ys[b.id].append(pool_feature(outs.get(b.id, [values[f] for f in feats]), feeds))
        else:
            for b in blocks:
                X[b.id].append(pool(values[b.entry], feeds, b.entry))
                Ys[b.id].append(pool(values[b.exit], feeds, b.exit))
    cat = np.concatenate
    predictions = None if any(p is None for p in preds) else cat(preds)
    after = {k: cat(v) for k, v in Ys.items()}
    if scope == "global":
        x = cat(X)
        return Features(scope, {b.id: x for b in blocks}, after, predictions, choice.name, t_ort, choice.reason)
    return Features(scope, {k: cat(v) for k, v in X.items()}, after, predictions, None, t_ort)


def score_blocks(model: onnx.ModelProto, data, *, blocks: Sequence[Block] | None = None,
                 metrics: Sequence[str] = DEFAULT_METRICS, scope: str = "global", feature: str | None = None,
                 indices=None, labels: np.ndarray | None = None, batch_size: int = 64, seed: int = 0,
                 pca_dim: int = 256, threads: int | None = None, progress: bool = False,
                 token_mask: Sequence[str] = (), task: str | None = None) -> ScoreRound:
    """Score ``blocks`` (default: all removable blocks of ``model``) with each metric and order them by
    the Consensus. ``data`` is a CalibrationData; ``indices`` the samples to use (default all); ``labels``
    (n,) class ids for the Gaussian metrics' conditions (default: the model's predicted class);
    ``token_mask``: token-mask overrides ``NAME:keep|pad`` (see ``graph.masks``); ``task``: classify | embed |
    generic, overriding the choice of the feature tensor (``graph.heads.choose_feature``)."""
    metrics = tuple(metrics)
    specs = [get_metric(m) for m in metrics]
    blocks = list(find_blocks(model).blocks if blocks is None else blocks)
    if not blocks:
        return ScoreRound(scope, feature, metrics, 0)
    feats = collect_features(model, data, blocks, scope=scope, feature=feature, indices=indices,
                             batch_size=batch_size, threads=threads, progress=progress, token_mask=token_mask,
                             task=task)
    t0 = time.perf_counter()
    # conditions (classes or clusters) come from the model's feature (global) or the first block's entry
    conditions = make_conditions(feats.predictions, feats.before[blocks[0].id], labels=labels, seed=seed)
    table: dict[str, dict[str, float]] = {}
    with threadpool_limits(limits=1):  # small dense problems: one BLAS thread avoids spin-wait overhead
        for b in blocks:
            table[b.id] = _score_one(specs, *feats.pair(b.id), conditions, seed, pca_dim)
    ranked = consensus(table, {b.id: b.position for b in blocks}, metrics)
    return ScoreRound(scope, feats.feature, metrics, feats.n_samples, ranked, feats.ort_seconds,
                      time.perf_counter() - t0, feats.feature_reason)


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
