"""Scores of decoder layers, for the removal schedule (low = the network barely changes without the layer).

* global scope (the Consensus as published, adapted): the final hidden state F (the LM head's input: the
  final norm's output, (batch, seq, hidden)) of the current model against F of the current model with the
  candidate layer also removed. Each candidate is removed from a weightless copy of the graph with
  ``kv_surgery.remove_layers`` (which handles the fused Skip-norm form, where removing a layer moves its closing
  norm's weight onto the previous norm); only the part of that graph that differs from the current model runs
  (``llm.suffix``: the layers after the candidate and the head), fed with the current model's values at the
  cut (one run of the current model per round provides them, kept for every window: about
  candidates x windows x seq x hidden floats). Same ops on the same values as running the candidate's whole
  model (graphs with subgraphs do exactly that), so the scores are those of the whole model to float rounding;
  a round costs one pass plus, per candidate, the fraction of the layers after it (about half a pass).
* local scope: each layer's entry against its exit (the residual stream before and after it) in one run of
  the current model; with the ``cosine`` metric this is ShortGPT's Block Influence.

Tokens are the samples: F (b, s, d) becomes (b*s, d), at most ``max_tokens`` rows drawn with a seeded
generator (the same rows for both sides, kept batch by batch: memory is bounded by the rows, not the windows).
Output-level metrics (``metrics.output``: ``output_kl``, ``output_agreement``, ``output_mse``, ``output_cosine``)
compare the next-token logits of the model without the layer with the ORIGINAL model's (``original_logits``,
computed once per run) on at most ``OUTPUT_REF_VALUES / vocab`` of those rows, so the reference stays a bounded
(rows, vocab) float32 array whatever the vocabulary (global scope only). Conditions for the Gaussian metrics: the current model's greedy
next token (``metrics.features.make_conditions``). Candidates keep the original model's layer ids (their
exit tensor names) and numbers through every round.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import onnx

from ..consensus import consensus
from ..errors import InputError
from ..graph.decoder import DecoderReport, prefill_feed
from ..graph.instrument import with_outputs  # noqa: F401  (re-exported: tests and callers import it here)
from ..graph.kv_surgery import remove_layers
from ..graph.weights import weightless
from ..metrics import get_metric, resolve_metrics
from ..metrics.features import make_conditions
from ..metrics.output import OutputAccumulator
from ..runtime import SHARED_ARENA, make_session
from ..scoring import FeatureCollector, Features, ScoreRound, collect, score_table
from .perplexity import logits_name
from .suffix import Suffix, cut_suffix, has_subgraphs, node_signatures

SCOPES = ("global", "local")
OUTPUT_REF_VALUES = 1 << 25
"""At most this many reference logits (float32: 128 MB) are kept for the output-level metrics."""


def final_hidden(model: onnx.ModelProto) -> str:
    """The final hidden state: the data input of the MatMul/Gemm (or int4 ``MatMulNBits``) producing the
    logits (the LM head), else the logits themselves."""
    name = logits_name(model)
    weights = {t.name for t in model.graph.initializer}
    weights |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    for n in model.graph.node:
        if name in n.output and n.op_type in ("MatMul", "Gemm", "MatMulNBits"):
            data = [i for i in n.input[:2] if i not in weights]
            if len(data) == 1:
                return data[0]
    return name


def _tokens(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1, a.shape[-1])


def take_rows(a: np.ndarray, keep: np.ndarray | None, start: int) -> np.ndarray:
    """One batch's tensor ``a`` (batch, seq, d) as token rows (batch * seq, d), only those among ``keep``
    (sorted indices into all the windows' tokens; None: every row); ``start``: the batch's first token."""
    t = _tokens(a)
    if keep is None:
        return t
    lo, hi = np.searchsorted(keep, [start, start + len(t)])
    return t[keep[lo:hi] - start]


def token_rows(n_tokens: int, max_tokens: int, seed: int) -> np.ndarray:
    """The token rows scored: all ``n_tokens`` when at most ``max_tokens``, else a seeded sorted sample."""
    if n_tokens <= max_tokens:
        return np.arange(n_tokens)
    return np.sort(np.random.default_rng(seed).choice(n_tokens, max_tokens, replace=False))


def output_rows_of(rows: np.ndarray, vocab: int, seed: int) -> np.ndarray:
    """The subset of ``rows`` the output-level metrics use: at most ``OUTPUT_REF_VALUES // vocab`` (>= 1)."""
    cap = max(1, OUTPUT_REF_VALUES // max(int(vocab), 1))
    if len(rows) <= cap:
        return rows
    return np.sort(np.random.default_rng(seed + 1).choice(rows, cap, replace=False))


def _starts(windows: np.ndarray, batch_size: int) -> list[int]:
    """The first token of each batch of ``batch_size`` windows."""
    sizes = [int(np.prod(windows[s:s + batch_size].shape)) for s in range(0, len(windows), batch_size)]
    return [int(v) for v in np.cumsum([0] + sizes[:-1])]


def _run(model: onnx.ModelProto, windows: np.ndarray, names: Sequence[str], batch_size: int,
         threads: int | None, rows: Sequence[np.ndarray | None] | np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``names`` of ``model`` over all windows, as token rows (n_windows * seq, d). ``rows``: the token rows to
    keep (sorted indices into the n_windows * seq tokens), one array for all names or one per name (None:
    every row); only those are kept, batch by batch."""
    sess = make_session(model, level="basic", threads=threads, arena=SHARED_ARENA)
    per_name = list(rows) if isinstance(rows, (list, tuple)) else [rows] * len(names)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start, s in zip(_starts(windows, batch_size), range(0, len(windows), batch_size)):
        outs = sess.run(list(names), prefill_feed(model, windows[s:s + batch_size]))
        for n, v, keep in zip(names, outs, per_name):
            parts[n].append(take_rows(v, keep, start))
    return {n: np.concatenate(v) for n, v in parts.items()}


def original_logits(model: onnx.ModelProto, windows: np.ndarray, *, seed: int = 0, max_tokens: int = 4096,
                    batch_size: int = 8, threads: int | None = None) -> np.ndarray:
    """The ORIGINAL model's next-token logits on the rows the output-level metrics use (``token_rows`` then
    ``output_rows_of``): (rows, vocab) float32, computed once per run and compared with every round."""
    lg = logits_name(model)
    rows = token_rows(windows.size, max_tokens, seed)
    probe = _run(model, windows[:1], [lg], 1, threads, rows=np.arange(1))[lg]
    out_rows = output_rows_of(rows, probe.shape[-1], seed)
    return _run(model, windows, [lg], batch_size, threads, rows=out_rows)[lg].astype(np.float32)


def candidate_suffixes(model: onnx.ModelProto, current: onnx.ModelProto, report: DecoderReport,
                       removed: Sequence[int], candidates: Sequence[int],
                       outputs: Sequence[str]) -> dict[int, Suffix | None]:
    """Per candidate layer, the part of (``model`` without ``removed`` and the candidate) that differs from
    ``current`` (``model`` without ``removed``), computing ``outputs`` (``llm.suffix``); None where the
    candidate's whole model must run (graphs with subgraphs). The surgery runs on a weightless copy: no
    weights are copied here."""
    if has_subgraphs(model):
        return {i: None for i in candidates}
    skeleton = weightless(model)
    signatures = node_signatures(current)
    return {i: cut_suffix(remove_layers(skeleton, [*removed, i], report=report), signatures, outputs)
            for i in candidates}


class LayerCollector(FeatureCollector):
    """The scoring pass of ``score_layers`` over token windows (see there for the arguments).

    ``setup`` opens the current model's session (global scope: the feature, the logits and every candidate's
    cut tensors exposed; local: every candidate's entry and exit); ``add_batch(k, feed)`` runs it on window
    batch k and keeps the scored token rows (and, global scope, the cut values and the logits rows the
    output-level metrics use). Global scope: ``finish`` then runs each candidate's suffix
    (``candidate_suffixes``) on the cut values, one candidate (one session) at a time."""

    def __init__(self, model: onnx.ModelProto, current: onnx.ModelProto, report: DecoderReport,
                 windows: np.ndarray, *, removed: Sequence[int], candidates: Sequence[int], scope: str,
                 feature: str | None, rows: np.ndarray, out_metrics: Sequence[str] = (),
                 reference: np.ndarray | None = None, seed: int = 0, batch_size: int = 8,
                 threads: int | None = None):
        self.by_index = report.by_index()
        super().__init__([self.by_index[i].block.id for i in candidates], scope)
        self.model, self.current, self.report, self.windows = model, current, report, windows
        self.removed, self.candidates, self.rows, self.seed = list(removed), list(candidates), rows, seed
        self.out_metrics, self.reference = tuple(out_metrics), reference
        self.batch_size, self.threads = batch_size, threads
        self.lg = logits_name(model)
        self.feature = feature if scope == "global" else None
        self.starts = _starts(windows, batch_size)
        self.out_rows: np.ndarray | None = None
        self._ref_parts: list[np.ndarray] = []  # the current model's logits rows, when no reference is given
        self._cached: list[dict[str, np.ndarray]] = []  # per batch: the cut values and the feed
        self.outputs: dict[str, dict[str, float]] = {}

    def batches(self):
        """(k, feed) of every batch of windows, for ``add_batch``."""
        for k, s in enumerate(range(0, len(self.windows), self.batch_size)):
            yield k, prefill_feed(self.current, self.windows[s:s + self.batch_size])

    def setup(self) -> None:
        if self.scope == "global":
            names = [self.feature, self.lg] if self.out_metrics else [self.feature]
            self.suffixes = candidate_suffixes(self.model, self.current, self.report, self.removed, self.candidates,
                                               names)
            self.cut = sorted({c for sx in self.suffixes.values() if sx is not None for c in sx.cut}
                              - {self.feature, self.lg})
            have = {o.name for o in self.current.graph.output}  # score_layers' own copy: exposed in place
            self.current.graph.output.extend(onnx.helper.make_empty_tensor_value_info(c) for c in self.cut
                                             if c not in have)
            self.names, run_model = [self.feature, self.lg, *self.cut], self.current
        else:
            kept = [i for i in sorted(self.by_index) if i not in self.removed]
            self.entry = {}
            prev = self.by_index[min(self.by_index)].block.entry  # the embeddings: the first kept layer's entry
            for i in kept:
                self.entry[i] = prev
                prev = self.by_index[i].block.exit
            taken = {self.entry[i] for i in self.candidates} | {self.by_index[i].block.exit for i in self.candidates}
            self.names = [*sorted(taken), self.lg]
            run_model = with_outputs(self.current, self.names)
        self.session = make_session(run_model, level="basic", threads=self.threads, arena=SHARED_ARENA)

    def add_batch(self, k: int, feed: dict[str, np.ndarray]) -> None:
        values = dict(zip(self.names, self.run(self.session, self.names, feed)))
        start = self.starts[k]
        logits = values[self.lg]
        self.add_predictions(take_rows(logits, self.rows, start).argmax(-1))
        if self.scope == "local":
            taken = {n: take_rows(values[n], self.rows, start) for n in self.names[:-1]}
            for i in self.candidates:
                b = self.by_index[i].block
                self.add_before(taken[self.entry[i]], b.id)
                self.add_after(b.id, taken[b.exit])
            return
        self.add_before(take_rows(values[self.feature], self.rows, start))
        if self.out_metrics:
            if self.out_rows is None:
                self.out_rows = output_rows_of(self.rows, logits.shape[-1], self.seed)
            if self.reference is None:
                self._ref_parts.append(take_rows(logits, self.out_rows, start))
        self._cached.append({**feed, **{c: values[c] for c in self.cut}})

    def finish(self) -> Features:
        if self.scope == "global":
            self._candidates()
        return super().finish()

    def output_scores(self) -> dict[str, dict[str, float]]:
        return self.outputs

    def _candidates(self) -> None:
        """Each candidate's feature rows (and logits rows, scored against the reference), one session at a time."""
        reference = None
        if self.out_metrics:
            reference = self.reference if self.reference is not None else np.concatenate(self._ref_parts)
            if len(reference) != len(self.out_rows):
                raise InputError(f"the reference logits have {len(reference)} rows, the scored windows "
                                 f"{len(self.out_rows)}")
            reference = reference.astype(np.float64)
        names = [self.feature, self.lg] if self.out_metrics else [self.feature]
        for i in self.candidates:
            bid, sx = self.by_index[i].block.id, self.suffixes[i]
            if sx is None:  # the whole candidate model
                run_model = remove_layers(self.model, [*self.removed, i], report=self.report)
                feeds = [prefill_feed(run_model, self.windows[s:s + self.batch_size])
                         for s in range(0, len(self.windows), self.batch_size)]
            else:
                feeds = [{n: c[n] for n in (*sx.inputs, *sx.cut)} for c in self._cached]
                run_model = sx.materialize(self.model, feeds[0])
            session = make_session(run_model, level="basic", threads=self.threads, arena=SHARED_ARENA)
            logits = []
            for k, feed in enumerate(feeds):
                got = self.run(session, names, feed)
                self.add_after(bid, take_rows(got[0], self.rows, self.starts[k]))
                if self.out_metrics:
                    logits.append(take_rows(got[1], self.out_rows, self.starts[k]))
            del session
            if self.out_metrics:
                acc = OutputAccumulator(self.out_metrics)
                acc.add(self.lg, reference, np.concatenate(logits).astype(np.float64), True)
                self.outputs[bid] = acc.scores()


def score_layers(model: onnx.ModelProto, report: DecoderReport, windows: np.ndarray, *,
                 removed: Sequence[int] = (), candidates: Sequence[int] | None = None,
                 metrics: Sequence[str] = ("cosine",), scope: str = "global", feature: str | None = None,
                 seed: int = 0, pca_dim: int = 256, batch_size: int = 8, threads: int | None = None,
                 max_tokens: int = 4096, weights: dict[str, float] | None = None,
                 reference: np.ndarray | None = None) -> ScoreRound:
    """Score the ``candidates`` (original layer numbers; default every layer not in ``removed``) of
    ``model`` (the original, with residual sums exposed for the fused form; ``report`` its layers) with
    ``removed`` already gone, on token ``windows`` (n, seq) int64. feature: the global scope's tensor
    (default ``final_hidden``). ``metrics``: names or presets (``metrics.presets``; the logits are class
    scores); ``weights``: the weighted rank sum's. ``reference``: for the output-level metrics, the original
    model's logits (``original_logits`` with the same windows, seed and max_tokens; None: the current
    model's, the same in round 1). Returns the round in Consensus order."""
    if scope not in SCOPES:
        raise InputError(f"--scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    metrics = resolve_metrics(metrics, True)
    specs = [get_metric(m) for m in metrics]
    out_specs = [sp for sp in specs if sp.output]
    if out_specs and scope != "global":
        raise InputError(f"output-level metrics ({', '.join(sp.name for sp in out_specs)}) need --scope global")
    by_index = report.by_index()
    removed = sorted(set(removed))
    candidates = [i for i in (by_index if candidates is None else candidates) if i not in removed]
    if not candidates:
        return ScoreRound(scope, feature, metrics, 0)
    if scope == "global":  # exposed before any removal: a removed last layer's norm output is handed on by name
        feature = feature or final_hidden(model)
        model = with_outputs(model, [feature])
    current = remove_layers(model, removed, report=report) if removed else model
    t0 = time.perf_counter()
    rows = token_rows(windows.size, max_tokens, seed)
    collector = LayerCollector(model, current, report, windows, removed=removed, candidates=candidates,
                               scope=scope, feature=feature, rows=rows, out_metrics=[sp.name for sp in out_specs],
                               reference=reference, seed=seed, batch_size=batch_size, threads=threads)
    feats = collect(collector, collector.batches())
    ort_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    conditions = make_conditions(feats.predictions, feats.before[collector.ids[0]], seed=seed)
    table = score_table(feats, specs, conditions, seed=seed, pca_dim=pca_dim, dtype=np.float64)
    positions = {by_index[i].block.id: i for i in candidates}
    ranked = consensus(table, positions, metrics, weights)
    return ScoreRound(scope, feature if scope == "global" else None, metrics, len(rows), ranked, ort_seconds,
                      time.perf_counter() - t1)
