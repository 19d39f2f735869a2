"""The staged criterion for decoder layers (issue 25): a one-pass local ranking, the global criterion on the few
best, and the residual stream carried from round to round instead of recomputed.

Each round, for the candidates the schedule gives:
1. prescreen: every candidate's Block Influence (the ``cosine`` metric, ShortGPT's: 1 - mean over the scored
   token rows of the cosine between the residual stream before and after the layer), read from the current
   model's hidden states, which this object holds (``cache``);
2. rescore: the ``top_k`` lowest are scored by ``metrics`` in the global scope, exactly as ``llm.scoring``
   scores them (the final hidden state and/or the next-token logits of the model without the layer, against
   the current model's / the ORIGINAL model's), each by running only its suffix (``llm.suffix``) on the cached
   values at its cut, and ranked by the Consensus; the others follow in prescreen order;
3. carry: the suffix of the round's winner also computes every cached tensor downstream of its layer; when
   the schedule removes it, those values replace the cached ones (``suffix.changed_tensors``) and everything
   upstream is kept, so the next round runs no layer whose values did not change. The current model runs in
   full once (the first round), and again only when a round starts from another model than the one carried
   (e.g. the schedule removed a layer other than the winner).

``top_k`` >= the number of candidates is the exact global criterion (the same scores, the same order).
Cost (n layers, R rounds, one pass = one forward over the scored windows): 1 pass + per round the ``top_k``
suffixes (each the fraction of the layers after its layer: at most ``top_k`` passes a round, about a tenth of
that when the last layers are the candidates); the exact global criterion takes R passes + the sum over rounds
of c(c-1)/(2n) for c candidates. Held between rounds, in a temporary file (``llm.held.HeldStore``; in memory one
batch at a time): the residual stream at each layer boundary, all scored windows ((layers + 1) x windows x seq
x hidden floats, float32 as the model computes it; in the fused form a cut's skip-norm pair is fed from the
boundary it sums, ``llm.held``), the final hidden state when a metric reads it, the cut's side tensors, and one
candidate's boundaries downstream of its layer (with several metrics, the ``top_k`` candidates'). In memory:
the reference logits ((rows, vocab) float32, at most ``llm.scoring.OUTPUT_REF_VALUES`` values), the run of one
batch (``llm.batching``) in the process-wide arena (``runtime.SHARED_ARENA``).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from threadpoolctl import threadpool_limits

from ..consensus import BlockScore, consensus
from ..errors import InputError
from ..graph.decoder import DecoderReport, prefill_feed
from ..graph.instrument import with_outputs
from ..graph.kv_surgery import remove_layers
from ..graph.weights import weightless
from ..metrics import get_metric, resolve_metrics, score
from ..metrics.features import make_conditions
from ..metrics.output import OutputAccumulator
from ..options import DECODER_PRESCREEN, CriterionOptions
from ..runtime import SHARED_ARENA, make_session
from ..scoring import ScoreRound, metric_scores
from .held import HeldStore, Stored, fed_from, held_feed, held_names
from .perplexity import logits_name
from .scoring import final_hidden, original_logits, output_rows_of, token_rows
from .suffix import changed_tensors, cut_suffix, node_signatures

__all__ = ["PRESCREEN_METRIC", "StagedRound", "StagedScorer", "staged_scorer"]

PRESCREEN_METRIC = "cosine"
"""The prescreen's score (``metrics`` registry name): Block Influence on the layer's entry and exit."""


@dataclass
class StagedRound(ScoreRound):
    """A staged round: ``ScoreRound`` (the rescored candidates in Consensus order, then the others in prescreen
    order) plus how it ran: candidates rescored, suffix runs, full runs of the current model, and the bytes of
    the values held for the next rounds when it ended (``StagedScorer.held_bytes``)."""

    rescored: int = 0
    suffix_runs: int = 0
    full_runs: int = 0
    held_bytes: int = 0

    def to_json(self) -> dict:
        return {**super().to_json(), "staged": {"prescreen": PRESCREEN_METRIC, "rescored": self.rescored,
                                                "suffix_runs": self.suffix_runs, "full_runs": self.full_runs,
                                                "held_bytes": self.held_bytes}}


@dataclass
class _Run:
    """One model's outputs over every batch: ``whole`` name -> per-batch arrays (b, s, ...) in the scorer's
    ``HeldStore``; ``logits``: the
    logits on the output metrics' rows, (rows, vocab) float32 (None without output metrics); ``predicted``:
    the greedy next token on the scored rows, (rows,) int64."""

    whole: dict[str, list[Stored]]
    logits: np.ndarray | None
    predicted: np.ndarray


def _token_rows(parts: list[Stored], rows: np.ndarray, store: HeldStore) -> np.ndarray:
    """Per-batch (b, s, d) arrays in ``store`` -> the token rows ``rows`` (sorted indices into all b*s tokens),
    (rows, d), read one batch at a time."""
    out, start = [], 0
    for part in parts:
        t = store.get(part)
        t = t.reshape(-1, t.shape[-1])
        lo, hi = np.searchsorted(rows, [start, start + len(t)])
        out.append(t[rows[lo:hi] - start] if hi - lo < len(t) else t)
        start += len(t)
    return np.concatenate(out)


class StagedScorer:
    """The staged criterion over the rounds of one schedule (module docstring). ``model``: the original (residual
    sums exposed in the fused form, as ``llm.scoring.score_layers`` takes it); ``windows``: (n, seq) int64;
    ``top_k``: candidates rescored per round (>= 1). Other arguments as ``score_layers``'; ``reference``: the
    original model's logits on the output rows (None: taken from the first round when it is the original model,
    else computed by ``original_logits``)."""

    def __init__(self, model: onnx.ModelProto, report: DecoderReport, windows: np.ndarray, *, top_k: int,
                 metrics: Sequence[str] = ("output",), feature: str | None = None, seed: int = 0,
                 pca_dim: int = 256, batch_size: int = 8, threads: int | None = None, max_tokens: int = 4096,
                 weights: dict[str, float] | None = None, reference: np.ndarray | None = None):
        self.metrics = resolve_metrics(metrics, True)
        specs = [get_metric(m) for m in self.metrics]
        self.specs = [sp for sp in specs if not sp.output]
        self.out_specs = [sp for sp in specs if sp.output]
        self.lg = logits_name(model)
        self.feature = feature or final_hidden(model)
        self.model = with_outputs(model, [self.feature])  # exposed before any removal, as score_layers does
        self.skeleton = weightless(self.model)
        self.report, self.by_index, self.windows = report, report.by_index(), windows
        self.top_k, self.seed, self.pca_dim, self.threads, self.weights = top_k, seed, pca_dim, threads, weights
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.rows = token_rows(windows.size, max_tokens, seed)
        self.out_rows: np.ndarray | None = None
        self.feeds = [prefill_feed(self.model, windows[s:s + batch_size]) for s in range(0, len(windows), batch_size)]
        self.reference = reference
        self.removed: tuple[int, ...] | None = None  # the model whose values ``cache`` holds
        self.store = HeldStore()  # the held values, batch by batch, out of memory (``llm.held``)
        self.cache: dict[str, list[Stored]] = {}
        self.predicted: np.ndarray | None = None
        self.pending: dict[int, _Run] = {}  # rescored candidates' runs: the next round's values if removed
        self.full_runs = self.suffix_runs = 0
        self._skeletons: dict[tuple[int, ...], onnx.ModelProto] = {}
        self._influence: dict[tuple[str, str], float] = {}  # (entry, exit) names -> the prescreen score

    # ------------------------------------------------------------------------------------------ running
    def _run(self, model: onnx.ModelProto, feeds: list[dict], whole: Sequence[str]) -> _Run:
        """``model``'s ``whole`` tensors (kept whole, per batch) and its logits (reduced to rows) over ``feeds``."""
        sess = make_session(model, level="basic", threads=self.threads, arena=SHARED_ARENA)
        names = [*dict.fromkeys([*whole, self.lg])]
        parts: dict[str, list[np.ndarray]] = {n: [] for n in whole}
        predicted, logits, start = [], [], 0
        for k, feed in enumerate(feeds):
            outputs = sess.run(names, feed)
            if k == 0 and len(whole) > 1:  # the run's held values from batch 0's (x2: the values carried later)
                held = sum(v.nbytes for n, v in zip(names, outputs) if n in parts)
                self.store.check_room(2 * len(self.feeds) * held)
            for n, v in zip(names, outputs):
                if n in parts:
                    parts[n].append(self.store.put(v))
                if n == self.lg:  # reduced batch by batch: a (tokens, vocab) array may be large
                    t = v.reshape(-1, v.shape[-1])
                    if self.out_specs and self.out_rows is None:
                        self.out_rows = output_rows_of(self.rows, t.shape[-1], self.seed)
                    for keep, to in ((self.rows, predicted), (self.out_rows, logits)):
                        if keep is not None:
                            lo, hi = np.searchsorted(keep, [start, start + len(t)])
                            got = t[keep[lo:hi] - start]
                            to.append(got.argmax(-1) if to is predicted else got.astype(np.float32))
                    start += len(t)
        out = np.concatenate(logits) if self.out_specs else None
        predicted = np.concatenate(predicted)
        return _Run(parts, out, predicted)

    def _skeleton(self, removed: Sequence[int]) -> onnx.ModelProto:
        """The weightless model without ``removed`` (built once per set: the candidates' graphs of a round, the
        next round's current graph among them)."""
        key = tuple(sorted(removed))
        if key not in self._skeletons:
            self._skeletons[key] = remove_layers(self.skeleton, key, report=self.report) if key else self.skeleton
        return self._skeletons[key]

    def _kept_feature(self) -> list[str]:
        """The feature when a metric reads it (the output metrics read the logits only)."""
        return [self.feature] if self.specs else []

    def close(self) -> None:
        """Delete the held values' file (the scorer cannot score after this)."""
        self.store.close()
        self.cache, self.pending = {}, {}

    def held_bytes(self) -> int:
        """Bytes of the values held between rounds (``cache``: boundaries, cut tensors, the feature; in the
        store's file, not in memory)."""
        return sum(a.nbytes for parts in self.cache.values() for a in parts)

    def _boundaries(self, removed: Sequence[int]) -> list[str]:
        """The residual stream of the model without ``removed``: the first layer's entry, each kept layer's exit."""
        kept = [i for i in sorted(self.by_index) if i not in removed]
        return [self.by_index[min(self.by_index)].block.entry, *(self.by_index[i].block.exit for i in kept)]

    def _refresh(self, removed: tuple[int, ...], candidates: Sequence[int]) -> None:
        """Run the current model in full: its boundaries, the feature and every candidate's cut into ``cache``."""
        current = self._skeleton(removed)
        signatures = node_signatures(current)
        cut: set[str] = set()
        for i in candidates:
            sx = cut_suffix(self._skeleton([*removed, i]), signatures,
                            [self.feature, self.lg])
            cut |= held_names(fed_from(current, sx)) if sx is not None else set()
        names = [*dict.fromkeys([*self._boundaries(removed), *self._kept_feature(), *sorted(cut)])]
        names = [n for n in names if n != self.lg]
        model = remove_layers(self.model, removed, report=self.report) if removed else self.model
        feeds = [prefill_feed(model, self.windows[s:s + self.batch_size])
                 for s in range(0, len(self.windows), self.batch_size)]
        run = self._run(with_outputs(model, names), feeds, names)
        self.full_runs += 1
        self.cache, self.predicted, self.removed, self.pending = run.whole, run.predicted, removed, {}
        self._influence = {}
        if self.out_specs and self.reference is None:
            self.reference = run.logits if not removed else original_logits(
                self.model, self.windows, seed=self.seed, max_tokens=self.max_tokens, batch_size=self.batch_size,
                threads=self.threads)

    def _advance(self, winner: int) -> None:
        """The schedule removed ``winner``, whose suffix ran: its values replace the cached ones it changes."""
        removed = tuple(sorted({*self.removed, winner}))
        pruned = self._skeleton(removed)
        changed = changed_tensors(pruned, node_signatures(self._skeleton(self.removed)))
        alive = {o for n in pruned.graph.node for o in n.output} | {v.name for v in pruned.graph.input}
        run = self.pending[winner]
        self.cache = {n: run.whole.get(n, v) for n, v in self.cache.items()
                      if n in alive and (n not in changed or n in run.whole)}
        self.predicted, self.removed, self.pending = run.predicted, removed, {}
        self._influence = {p: v for p, v in self._influence.items() if not (set(p) & changed)}

    # ------------------------------------------------------------------------------------------ scoring
    def _prescreen(self, removed: Sequence[int], candidates: Sequence[int]) -> dict[int, float]:
        """Block Influence of each candidate, from the cached stream before and after it."""
        stream = self._boundaries(removed)
        kept = [i for i in sorted(self.by_index) if i not in removed]
        out = {}
        for k, i in enumerate(kept):
            pair = (stream[k], stream[k + 1])
            if i in candidates and pair not in self._influence:  # kept while neither value changes
                x, y = (_token_rows(self.cache[n], self.rows, self.store) for n in pair)
                self._influence[pair] = score(PRESCREEN_METRIC, x, y)
            if i in candidates:
                out[i] = self._influence[pair]
        return out

    def _candidate(self, i: int, removed: tuple[int, ...], signatures: dict) -> _Run:
        """Run candidate ``i``'s suffix (its whole model when it has none) for the feature, the logits and the
        cached tensors its removal changes."""
        pruned = self._skeleton([*removed, i])
        changed = changed_tensors(pruned, signatures)
        carry = [n for n in self.cache if n in changed and n != self.feature]
        outputs = [self.feature, self.lg, *carry]
        sx = cut_suffix(pruned, signatures, outputs)
        how = fed_from(self._skeleton(removed), sx) if sx is not None else {}
        if sx is None or any(h not in self.cache for h in held_names(how)):
            model = remove_layers(self.model, [*removed, i], report=self.report)
            feeds = [prefill_feed(model, self.windows[s:s + self.batch_size])
                     for s in range(0, len(self.windows), self.batch_size)]
            self.full_runs += 1
            return self._run(with_outputs(model, outputs), feeds, [*self._kept_feature(), *carry])
        feeds = ({**{n: f[n] for n in sx.inputs}, **held_feed(self.cache, how, k, self.store)}
                 for k, f in enumerate(self.feeds))
        self.suffix_runs += 1
        model = sx.materialize(self.model, {**self.feeds[0], **held_feed(self.cache, how, 0, self.store)})
        return self._run(model, feeds, [*self._kept_feature(), *carry])

    def _scores(self, run: _Run, x: np.ndarray, conditions) -> dict[str, float]:
        """The ``metrics`` of one candidate: its feature rows against the current model's ``x`` (rows, d), its
        logits against the reference."""
        out = {}
        if self.specs:
            y = _token_rows(run.whole[self.feature], self.rows, self.store).astype(np.float64)
            with threadpool_limits(limits=1):
                out.update(metric_scores(self.specs, x, y, conditions, seed=self.seed, pca_dim=self.pca_dim))
        if self.out_specs:
            acc = OutputAccumulator([sp.name for sp in self.out_specs])
            acc.add(self.lg, self.reference, run.logits, True)  # float64 a chunk at a time, not whole
            out.update(acc.scores())
        return out

    def round(self, removed: Sequence[int], candidates: Sequence[int]) -> StagedRound:
        """Score ``candidates`` (original layer numbers) of the model without ``removed``; the round in order."""
        removed = tuple(sorted(set(removed)))
        candidates = [i for i in candidates if i not in removed]
        runs0, full0 = self.suffix_runs, self.full_runs
        t0 = time.perf_counter()
        if self.removed != removed:
            new = set(removed) - set(self.removed or ())
            if self.removed is not None and set(self.removed) <= set(removed) and len(new) == 1 \
                    and next(iter(new)) in self.pending:
                self._advance(next(iter(new)))
            else:
                self._refresh(removed, candidates)
        self._skeletons = {k: v for k, v in self._skeletons.items() if set(removed) <= set(k)}
        if not candidates:
            return StagedRound("global", self.feature, self.metrics, len(self.rows))
        bi = self._prescreen(removed, candidates)
        screened = sorted(candidates, key=lambda i: (bi[i], i))
        top = screened[:self.top_k]
        x = _token_rows(self.cache[self.feature], self.rows, self.store).astype(np.float64) if self.specs else None
        conditions = make_conditions(self.predicted, x, seed=self.seed) if self.specs else None
        signatures = node_signatures(self._skeleton(removed))
        table, keep_all, best, metric_seconds = {}, len(self.metrics) > 1, None, 0.0
        for i in top:
            run = self._candidate(i, removed, signatures)
            bid = self.by_index[i].block.id
            t1 = time.perf_counter()
            table[bid] = self._scores(run, x, conditions)
            run.logits = None  # scored: a pending run carries the values downstream, not its (rows, vocab) logits
            metric_seconds += time.perf_counter() - t1
            key = (table[bid][self.metrics[0]], i)
            if keep_all or best is None or key < best:
                if not keep_all:
                    self.pending.clear()
                self.pending[i], best = run, key
        ort_seconds = time.perf_counter() - t0 - metric_seconds  # the runs, the prescreen and the graph work
        positions = {self.by_index[i].block.id: i for i in top}
        ranked = consensus(table, positions, self.metrics, self.weights)
        rest = [BlockScore(self.by_index[i].block.id, {}, position=i) for i in screened[len(top):]]
        for b in [*ranked, *rest]:
            b.scores[f"prescreen_{PRESCREEN_METRIC}"] = float(bi[b.position])
        return StagedRound("global", self.feature, self.metrics, len(self.rows), [*ranked, *rest], ort_seconds,
                           metric_seconds, rescored=len(top), suffix_runs=self.suffix_runs - runs0,
                           full_runs=self.full_runs - full0, held_bytes=self.held_bytes())


def staged_scorer(model: onnx.ModelProto, report: DecoderReport, windows: np.ndarray, criterion: CriterionOptions,
                  kw: dict) -> StagedScorer | None:
    """The staged scorer of a decoder run (``--prescreen K``, default ``DECODER_PRESCREEN``), or None where every
    candidate is scored every round: ``--prescreen 0``, the local scope (already one pass a round), or fewer
    layers than K + 1 (the exact criterion costs no more). ``kw``: ``score_layers``' keywords."""
    k = DECODER_PRESCREEN if criterion.prescreen is None else criterion.prescreen
    if k < 0:
        raise InputError("--prescreen must be >= 0")
    if k == 0 or criterion.scope != "global" or len(report.layers) <= k:
        return None
    return StagedScorer(model, report, windows, top_k=k, **{a: v for a, v in kw.items() if a != "scope"})
