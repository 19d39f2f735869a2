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
from .evaluate import batch_rows, reference_outputs
from .graph.blocks import Block, find_blocks
from .kinds.basic import CLASS_SCORES
from .kinds.outputs import choose_feature, output_kinds, score_forms
from .metrics.features import pool_output
from .metrics.output import is_class_scores
from .graph.instrument import expose, suffix_model
from .graph.ir import GraphIndex, to_gs
from .graph.masks import TokenMask, token_masks
from .graph.weights import initializer_bytes, weightless
from .kinds import output_plan
from .metrics import DEFAULT_METRICS, get_metric, resolve_metrics, score
from .metrics.features import make_conditions, pca_cap, pool_features
from .metrics.output import OutputAccumulator, output_rows
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


def _predictions(out: np.ndarray) -> np.ndarray | None:
    return np.argmax(out, axis=-1) if is_class_scores(out.shape, None, sequence=False) else None


def collect_features(model: onnx.ModelProto, data, blocks: Sequence[Block], *, scope: str = "global",
                     feature: str | None = None, indices=None, batch_size: int = 64,
                     threads: int | None = None, progress: bool = False, share_weights: bool | None = None,
                     token_mask: Sequence[str] = (), task: str | None = None, output_metrics: Sequence[str] = (),
                     reference: list[dict[str, np.ndarray]] | None = None, plan=None) -> Features:
    """Run the calibration data once and return the pooled ``Features`` of every block in ``blocks``.

    The global scope's feature: ``feature`` when named, else ``graph.heads.choose_feature`` (the classifier
    head's input, or the graph's float outputs, pooled by ``graph.heads.pool_output`` and concatenated);
    ``task`` (classify | embed | generic) overrides that choice.

    output_metrics (global scope): also run each suffix to the float graph outputs it changes and score them
    against ``reference`` (``original_outputs`` on the same data, indices and batch size; None: the current
    model's outputs) with these output-level metrics (``Features.outputs``); ``plan`` (``kinds.OutputPlan``,
    default ``kinds.output_plan(model, task)``) says what each output is and how ``output_fidelity`` measures it.

    Token tensors are averaged over the tokens a mask input keeps (``graph.masks.token_masks``;
    ``token_mask``: overrides ``NAME:keep|pad``). share_weights: give every session one shared copy of the
    initializers (default: for models whose weights exceed runtime.SHARE_WEIGHTS_BYTES), so memory stays
    near one copy of the weights."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}")
    masks = token_masks(model, token_mask)
    output0 = model.graph.output[0].name
    output_metrics = tuple(output_metrics)
    if plan is None and output_metrics:
        plan = output_plan(model, task)
    if output_metrics and scope != "global":
        raise InputError(f"output-level metrics ({', '.join(output_metrics)}) need --scope global; with --scope "
                         "local choose representation metrics, e.g. --metrics paper")
    deps: dict[str, list[str]] = {}  # block id -> the graph outputs its suffix computes (besides the feature)
    t_ort = 0.0
    shared = SharedWeights(model) if (share_weights if share_weights is not None
                                      else initializer_bytes(model) > SHARE_WEIGHTS_BYTES) else None

    def session(m: onnx.ModelProto, level: str):  # no arena: a run's tensors are freed when it ends
        if shared:
            return shared.session(m, level=level, threads=threads, arena=False)
        return make_session(m, level=level, threads=threads, arena=False)

    # With shared weights, all graph work happens on a weightless copy: suffix models cost no weights.
    graph_model = weightless(model) if shared else model
    kinds = plan.kinds if plan is not None else output_kinds(graph_model, task)
    outs = list(kinds) if output_metrics else []
    # class scores written as probabilities (a Softmax output) are compared as their log: the softmax of
    # probabilities would flatten both distributions (``graph.heads.score_forms``)
    as_log = {o for o, f in score_forms(graph_model, kinds).items() if f == "probabilities"} if outs else set()
    if output_metrics and not outs:
        if shared:
            shared.close()
        raise InputError("output-level metrics need a floating-point graph output; choose e.g. --metrics paper")
    try:
        sessions = {}
        choice = None
        # the Gaussian metrics' conditions: the predicted class only when the first output is class scores
        classes = next(iter(kinds.values()), None) == CLASS_SCORES
        if scope == "global":
            choice = choose_feature(graph_model, blocks, task=task, feature=feature,
                                    kinds=plan.kinds if plan is not None else None)
            feats = list(choice.tensors)
            graph_inputs = {i.name for i in model.graph.input}
            cut: set[str] = set()
            index = GraphIndex(to_gs(graph_model)) if outs else None
            for b in blocks:  # one suffix model at a time: only its session is kept
                deps[b.id] = [o for o in _dependent_outputs(index, b, outs) if o not in feats]
                s = suffix_model(graph_model, b, feats + deps[b.id])
                cut.update(s.inputs)
                if not s.passthrough:
                    sessions[b.id] = session(s.model, "all")
            needed = list(dict.fromkeys(feats + [output0] + outs + sorted(cut - graph_inputs)))
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
    accs = {b.id: OutputAccumulator(output_metrics, plan) for b in blocks} if output_metrics else {}
    batches = counted_batches(data, batch_size, indices)
    rows_of = batch_rows(data)
    if progress:
        from tqdm import tqdm

        total = len(indices) if indices is not None else data.n_samples
        step = data.fixed_batch or batch_size
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
    values = batch_ref = None
    for k, (feeds, n_real) in enumerate(batches):
        n_now[0] = n_real
        values = batch_ref = None  # the previous batch's tensors go before this batch's run
        t0 = time.perf_counter()
        values = dict(zip(full_names, full.run(None, feeds)))
        values.update(feeds)
        t_ort += time.perf_counter() - t0
        fed = rows_of(feeds)
        batch_ref = None
        if accs:
            if reference is not None and k >= len(reference):
                raise InputError("the reference outputs cover fewer batches than the data")
            ref = (reference[k] if reference is not None else
                   {o: per_sample(values[o], fed, n_real, name=f"output {o!r}", strict=False) for o in outs})
            batch_ref = _BatchOutputs(ref, values, outs, feeds, masks, kinds, fed, n_real, as_log)
        p = _predictions(per_sample(values[output0], fed, n_real, strict=False)) if classes else None
        preds.append(p)
        if scope == "local":
            for b in blocks:
                X[b.id].append(pool(values[b.entry], feeds, b.entry))
                Ys[b.id].append(pool(values[b.exit], feeds, b.exit))
            continue
        X.append(pool_feature([values[f] for f in feats], feeds))
        for b in blocks:  # one candidate at a time: only its suffix's outputs are held
            got = None
            if b.id in sessions:
                sess, names = sessions[b.id], feats + deps[b.id]
                t0 = time.perf_counter()
                got = dict(zip(names, sess.run(names, {i.name: values[i.name] for i in sess.get_inputs()})))
                t_ort += time.perf_counter() - t0
            Ys[b.id].append(pool_feature([(got or values)[f] for f in feats], feeds))
            if batch_ref is not None:
                batch_ref.accumulate(accs[b.id], got)
            del got
    cat = np.concatenate
    predictions = None if any(p is None for p in preds) else cat(preds)
    after = {k: cat(v) for k, v in Ys.items()}
    if scope == "global":
        x = cat(X)
        return Features(scope, {b.id: x for b in blocks}, after, predictions, choice.name, t_ort, choice.reason,
                        {bid: acc.scores() for bid, acc in accs.items()})
    return Features(scope, {k: cat(v) for k, v in X.items()}, after, predictions, None, t_ort)


def _dependent_outputs(index: GraphIndex | None, block: Block, outs: Sequence[str]) -> list[str]:
    """The graph outputs among ``outs`` downstream of ``block``'s exit (the others equal the full model's)."""
    if not outs:
        return []
    down = index.descendants(block.exit)
    return [o for o in outs if o in index.producer and id(index.producer[o]) in down]


class _BatchOutputs:
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
            keep = _mask_for(feeds, values[o], masks)
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


def score_blocks(model: onnx.ModelProto, data, *, blocks: Sequence[Block] | None = None,
                 metrics: Sequence[str] = DEFAULT_METRICS, scope: str = "global", feature: str | None = None,
                 indices=None, labels: np.ndarray | None = None, batch_size: int = 64, seed: int = 0,
                 pca_dim: int = 256, threads: int | None = None, progress: bool = False,
                 token_mask: Sequence[str] = (), task: str | None = None, weights: dict[str, float] | None = None,
                 reference: list[dict[str, np.ndarray]] | None = None, plan=None) -> ScoreRound:
    """Score ``blocks`` (default: all removable blocks of ``model``) with each metric and order them by
    the Consensus. ``data`` is a CalibrationData; ``indices`` the samples to use (default all); ``labels``
    (n,) class ids for the Gaussian metrics' conditions (default: the model's predicted class);
    ``token_mask``: token-mask overrides ``NAME:keep|pad`` (see ``graph.masks``); ``task``: classify | embed |
    generic, overriding the choice of the feature tensor (``graph.heads.choose_feature``) and the kind of the
    first output. ``metrics``: names or presets (``metrics.presets``: paper, output, a+b); ``weights``: the
    weighted rank sum's weights. ``reference``: for the output-level metrics, the ORIGINAL model's outputs
    (``original_outputs`` on the same ``indices`` and ``batch_size``); None compares with ``model``'s own
    outputs (the same in round 1). ``plan``: the output plan (``kinds.output_plan``; default: from the graph
    and ``task``), which the ``output`` preset and ``output_fidelity`` read."""
    plan = output_plan(model, task) if plan is None else plan
    metrics = resolve_metrics(metrics, has_class_scores(model, task), plan)
    specs = [get_metric(m) for m in metrics]
    out_specs = [s for s in specs if s.output]
    specs = [s for s in specs if not s.output]
    blocks = list(find_blocks(model).blocks if blocks is None else blocks)
    if not blocks:
        return ScoreRound(scope, feature, metrics, 0)
    feats = collect_features(model, data, blocks, scope=scope, feature=feature, indices=indices,
                             batch_size=batch_size, threads=threads, progress=progress, token_mask=token_mask,
                             task=task, output_metrics=[s.name for s in out_specs], reference=reference, plan=plan)
    t0 = time.perf_counter()
    # conditions (classes or clusters) come from the model's feature (global) or the first block's entry
    conditions = make_conditions(feats.predictions, feats.before[blocks[0].id], labels=labels, seed=seed)
    table: dict[str, dict[str, float]] = {}
    with threadpool_limits(limits=1):  # small dense problems: one BLAS thread avoids spin-wait overhead
        for b in blocks:
            table[b.id] = _score_one(specs, *feats.pair(b.id), conditions, seed, pca_dim) if specs else {}
            for s in out_specs:
                if s.name not in feats.outputs[b.id]:
                    raise InputError(f"{s.name} needs a class-score output; this model has none: use output_mse / "
                                     "output_cosine (or --task classify if its first output is class scores)")
                table[b.id][s.name] = feats.outputs[b.id][s.name]
    ranked = consensus(table, {b.id: b.position for b in blocks}, metrics, weights)
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
