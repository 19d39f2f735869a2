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
from .graph.ir import GraphIndex, to_gs
from .graph.masks import TokenMask, token_masks
from .graph.weights import initializer_bytes, weightless
from .errors import InputError
from .metrics import DEFAULT_METRICS, get_metric, resolve_metrics, score
from .metrics.features import make_conditions, pca_cap, pool_features
from .metrics.output import OutputAccumulator, is_class_scores, output_rows
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
    predictions: (n,) argmax of the model's first output, None when it is not (n, classes).
    feature: the feature tensor's name (global scope), else None. ort_seconds: time spent in onnxruntime.
    outputs: block id -> {output metric: score} (``metrics.output``), the graph outputs without the block vs
    the reference outputs (the original model's when given, else the current model's); empty when no
    output metric was asked for.
    """

    scope: str
    before: dict[str, np.ndarray]
    after: dict[str, np.ndarray]
    predictions: np.ndarray | None
    feature: str | None
    ort_seconds: float
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)

    def pair(self, block_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(X, Y) for one block, each (n, d)."""
        return self.before[block_id], self.after[block_id]

    @property
    def n_samples(self) -> int:
        return len(next(iter(self.after.values()))) if self.after else 0


def float_outputs(model: onnx.ModelProto) -> list[str]:
    """Names of the graph's floating-point outputs, the ones the output metrics compare."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    return [o.name for o in model.graph.output if o.type.tensor_type.elem_type in floats]


def has_class_scores(model: onnx.ModelProto) -> bool:
    """Whether a float graph output is declared (N, C) or (N, T, C) with a static C > 1."""
    for o in model.graph.output:
        if o.name not in float_outputs(model):
            continue
        dims = o.type.tensor_type.shape.dim
        if len(dims) in (2, 3) and dims[-1].HasField("dim_value") and dims[-1].dim_value > 1:
            return True
    return False


def original_outputs(model: onnx.ModelProto, data, indices=None, *, batch_size: int = 64,
                     threads: int | None = None) -> list[dict[str, np.ndarray]]:
    """The float graph outputs of ``model`` on ``data`` (the samples ``indices``), one {name: array} per batch
    of ``data.batches(batch_size, indices)``: the reference the output metrics compare with. Computed once per
    prune run on the original model, so every round is anchored to it."""
    names = float_outputs(model)
    sess = make_session(model, level="all", threads=threads)
    return [dict(zip(names, sess.run(names, feeds))) for feeds in data.batches(batch_size, indices)]


def _predictions(out: np.ndarray) -> np.ndarray | None:
    return np.argmax(out, axis=-1) if out.ndim == 2 and out.shape[1] > 1 else None


def collect_features(model: onnx.ModelProto, data, blocks: Sequence[Block], *, scope: str = "global",
                     feature: str | None = None, indices=None, batch_size: int = 64,
                     threads: int | None = None, progress: bool = False, share_weights: bool | None = None,
                     token_mask: Sequence[str] = (), output_metrics: Sequence[str] = (),
                     reference: list[dict[str, np.ndarray]] | None = None) -> Features:
    """Run the calibration data once and return the pooled ``Features`` of every block in ``blocks``.

    output_metrics (global scope): also run each suffix to the float graph outputs and score them against
    ``reference`` (``original_outputs`` on the same data, indices and batch size; None: the current model's
    outputs) with these output-level metrics (``Features.outputs``).

    Token tensors are averaged over the tokens a mask input keeps (``graph.masks.token_masks``;
    ``token_mask``: overrides ``NAME:keep|pad``). share_weights: give every session one shared copy of the
    initializers (default: for models whose weights exceed runtime.SHARE_WEIGHTS_BYTES), so memory stays
    near one copy of the weights."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}")
    masks = token_masks(model, token_mask)
    output0 = model.graph.output[0].name
    output_metrics = tuple(output_metrics)
    if output_metrics and scope != "global":
        raise InputError(f"output-level metrics ({', '.join(output_metrics)}) need --scope global; with --scope "
                         "local choose representation metrics, e.g. --metrics paper")
    outs = float_outputs(model) if output_metrics else []
    if output_metrics and not outs:
        raise InputError("output-level metrics need a floating-point graph output; choose e.g. --metrics paper")
    deps: dict[str, list[str]] = {}  # block id -> the graph outputs its suffix computes
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
            index = GraphIndex(to_gs(graph_model)) if outs else None
            for b in blocks:  # one suffix model at a time: only its session is kept
                deps[b.id] = _dependent_outputs(index, b, outs)
                s = suffix_model(graph_model, b, [feature] + deps[b.id])
                cut.update(s.inputs)
                if not s.passthrough:
                    sessions[b.id] = session(s.model, "all")
            needed = list(dict.fromkeys([feature, output0] + outs + sorted(cut - graph_inputs)))
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
    accs = {b.id: OutputAccumulator(output_metrics) for b in blocks} if output_metrics else {}
    batches = data.batches(batch_size, indices)
    if progress:
        from tqdm import tqdm

        total = len(indices) if indices is not None else data.n_samples
        batches = tqdm(batches, total=-(-total // batch_size), desc=f"scoring {len(blocks)} blocks", unit="batch", leave=False)

    def pool(act: np.ndarray, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return pool_features(act, _mask_for(feeds, act, masks)).astype(np.float32)

    for k, feeds in enumerate(batches):
        t0 = time.perf_counter()
        values = dict(zip(full_names, full.run(None, feeds)))
        values.update(feeds)
        if scope == "global":
            runs = {bid: sess.run(None, {i.name: values[i.name] for i in sess.get_inputs()})
                    for bid, sess in sessions.items()}
            feats_after = {bid: r[0] for bid, r in runs.items()}
        t_ort += time.perf_counter() - t0
        if accs:
            if reference is not None and k >= len(reference):
                raise InputError("the reference outputs cover fewer batches than the data")
            ref = reference[k] if reference is not None else {o: values[o] for o in outs}
            _accumulate(accs, blocks, deps, runs, values, ref, outs, feeds, masks)
        p = _predictions(values[output0])
        preds.append(p)
        if scope == "global":
            X.append(pool(values[feature], feeds))
            for b in blocks:
                Ys[b.id].append(pool(feats_after.get(b.id, values[feature]), feeds))
        else:
            for b in blocks:
                X[b.id].append(pool(values[b.entry], feeds))
                Ys[b.id].append(pool(values[b.exit], feeds))
    cat = np.concatenate
    predictions = None if any(p is None for p in preds) else cat(preds)
    after = {k: cat(v) for k, v in Ys.items()}
    if scope == "global":
        x = cat(X)
        return Features(scope, {b.id: x for b in blocks}, after, predictions, feature, t_ort,
                        {bid: acc.scores() for bid, acc in accs.items()})
    return Features(scope, {k: cat(v) for k, v in X.items()}, after, predictions, None, t_ort)


def _dependent_outputs(index: GraphIndex | None, block: Block, outs: Sequence[str]) -> list[str]:
    """The graph outputs among ``outs`` downstream of ``block``'s exit (the others equal the full model's)."""
    if not outs:
        return []
    down = index.descendants(block.exit)
    return [o for o in outs if o in index.producer and id(index.producer[o]) in down]


def _accumulate(accs, blocks, deps, runs, values, ref, outs, feeds, masks) -> None:
    """One batch of output scores: each block's suffix outputs (or the full model's, for outputs that do not
    depend on it) against the reference outputs, on the rows ``metrics.output.output_rows`` keeps."""
    for o in outs:
        r = ref[o]
        if r.shape != values[o].shape:
            raise InputError(f"output {o}: reference shape {r.shape} differs from the model's {values[o].shape}")
        keep = _mask_for(feeds, r, masks)
        ref_rows = output_rows(r, keep)
        cls = is_class_scores(r.shape, r.dtype)
        for b in blocks:
            got = runs.get(b.id)
            arr = got[1 + deps[b.id].index(o)] if got is not None and o in deps[b.id] else values[o]
            accs[b.id].add(o, ref_rows, output_rows(arr, keep), cls)


def score_blocks(model: onnx.ModelProto, data, *, blocks: Sequence[Block] | None = None,
                 metrics: Sequence[str] = DEFAULT_METRICS, scope: str = "global", feature: str | None = None,
                 indices=None, labels: np.ndarray | None = None, batch_size: int = 64, seed: int = 0,
                 pca_dim: int = 256, threads: int | None = None, progress: bool = False,
                 token_mask: Sequence[str] = (), weights: dict[str, float] | None = None,
                 reference: list[dict[str, np.ndarray]] | None = None) -> ScoreRound:
    """Score ``blocks`` (default: all removable blocks of ``model``) with each metric and order them by
    the Consensus. ``data`` is a CalibrationData; ``indices`` the samples to use (default all); ``labels``
    (n,) class ids for the Gaussian metrics' conditions (default: the model's predicted class);
    ``token_mask``: token-mask overrides ``NAME:keep|pad`` (see ``graph.masks``). ``metrics``: names or
    presets (``metrics.presets``: paper, output, a+b); ``weights``: the weighted rank sum's weights.
    ``reference``: for the output-level metrics, the ORIGINAL model's outputs (``original_outputs`` on the
    same ``indices`` and ``batch_size``); None compares with ``model``'s own outputs (the same in round 1)."""
    metrics = resolve_metrics(metrics, has_class_scores(model))
    specs = [get_metric(m) for m in metrics]
    out_specs = [s for s in specs if s.output]
    specs = [s for s in specs if not s.output]
    blocks = list(find_blocks(model).blocks if blocks is None else blocks)
    if not blocks:
        return ScoreRound(scope, feature, metrics, 0)
    feats = collect_features(model, data, blocks, scope=scope, feature=feature, indices=indices,
                             batch_size=batch_size, threads=threads, progress=progress, token_mask=token_mask,
                             output_metrics=[s.name for s in out_specs], reference=reference)
    t0 = time.perf_counter()
    # conditions (classes or clusters) come from the model's feature (global) or the first block's entry
    conditions = make_conditions(feats.predictions, feats.before[blocks[0].id], labels=labels, seed=seed)
    table: dict[str, dict[str, float]] = {}
    with threadpool_limits(limits=1):  # small dense problems: one BLAS thread avoids spin-wait overhead
        for b in blocks:
            table[b.id] = _score_one(specs, *feats.pair(b.id), conditions, seed, pca_dim) if specs else {}
            for s in out_specs:
                if s.name not in feats.outputs[b.id]:
                    raise InputError(f"{s.name} needs a class-score output (N, C) or (N, T, C); this model has "
                                     "none: use output_mse / output_cosine")
                table[b.id][s.name] = feats.outputs[b.id][s.name]
    ranked = consensus(table, {b.id: b.position for b in blocks}, metrics, weights)
    return ScoreRound(scope, feats.feature, metrics, feats.n_samples, ranked, feats.ort_seconds,
                      time.perf_counter() - t0)


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
