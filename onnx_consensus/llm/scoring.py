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
from threadpoolctl import threadpool_limits

from ..consensus import BlockScore, consensus
from ..errors import InputError
from ..graph.decoder import DecoderReport, prefill_feed
from ..graph.instrument import with_outputs  # noqa: F401  (re-exported: tests and callers import it here)
from ..graph.kv_surgery import remove_layers
from ..graph.weights import weightless
from ..metrics import get_metric, resolve_metrics
from ..metrics.features import make_conditions
from ..metrics.output import OutputAccumulator
from ..runtime import make_session
from ..scoring import ScoreRound, _score_one
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


def _run(model: onnx.ModelProto, windows: np.ndarray, names: Sequence[str], batch_size: int,
         threads: int | None, rows: Sequence[np.ndarray | None] | np.ndarray | None = None,
         cache: Sequence[str] = (), feeds: Sequence[dict] | None = None) -> dict[str, np.ndarray]:
    """``names`` of ``model`` over all windows, as token rows (n_windows * seq, d). ``rows``: the token rows to
    keep (sorted indices into the n_windows * seq tokens), one array for all names or one per name (None:
    every row); only those are kept, batch by batch. ``cache``: more tensors returned whole, as one list of
    per-batch arrays each (under the same names). ``feeds``: the per-batch feeds (default ``prefill_feed``)."""
    sess = make_session(model, level="basic", threads=threads)
    per_name = list(rows) if isinstance(rows, (list, tuple)) else [rows] * len(names)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in [*names, *cache]}
    start = 0
    for k, s in enumerate(range(0, len(windows), batch_size)):
        feed = feeds[k] if feeds is not None else prefill_feed(model, windows[s:s + batch_size])
        outs = sess.run([*names, *cache], feed)
        for n, v, keep in zip(names, outs, per_name):
            t = _tokens(v)
            if keep is not None:
                lo, hi = np.searchsorted(keep, [start, start + len(t)])
                t = t[keep[lo:hi] - start]
            parts[n].append(t)
        for n, v in zip(cache, outs[len(names):]):
            parts[n].append(v)
        start += int(np.prod(windows[s:s + batch_size].shape))
    return {n: (np.concatenate(v) if n in names else v) for n, v in parts.items()}


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


def _global_pairs(model: onnx.ModelProto, current: onnx.ModelProto, report: DecoderReport, windows: np.ndarray,
                  removed: Sequence[int], candidates: Sequence[int], feature: str, lg: str, rows: np.ndarray,
                  out_specs, reference: np.ndarray | None, pairs: dict, outputs: dict, *, seed: int,
                  batch_size: int, threads: int | None) -> np.ndarray:
    """Global scope: fill ``pairs`` (block id -> (F of ``current``, F without the candidate), token rows) and
    ``outputs`` (block id -> output-level scores against ``reference``); return the current model's greedy
    next tokens on ``rows``. One run of ``current`` (``feature``, logits ``lg`` and every candidate's cut
    tensors), then each candidate's suffix (``candidate_suffixes``) on the cut values."""
    by_index = report.by_index()
    names = [feature, lg] if out_specs else [feature]
    suffixes = candidate_suffixes(model, current, report, removed, candidates, names)
    cut = sorted({c for sx in suffixes.values() if sx is not None for c in sx.cut} - {feature, lg})
    have = {o.name for o in current.graph.output}  # current is score_layers' own copy: exposed in place
    current.graph.output.extend(onnx.helper.make_empty_tensor_value_info(c) for c in cut if c not in have)
    feeds = [prefill_feed(current, windows[s:s + batch_size]) for s in range(0, len(windows), batch_size)]
    ref = _run(current, windows, [feature, lg], batch_size, threads, rows=rows, cache=cut, feeds=feeds)
    x = ref[feature]
    predicted = ref[lg].argmax(-1)
    out_rows = output_rows_of(rows, ref[lg].shape[-1], seed) if out_specs else None
    if out_specs and reference is None:
        reference = ref[lg][np.searchsorted(rows, out_rows)]
    if out_specs and len(reference) != len(out_rows):
        raise InputError(f"the reference logits have {len(reference)} rows, the scored windows {len(out_rows)}")
    cached = {c: ref[c] for c in cut}
    reference64 = reference.astype(np.float64) if out_specs else None
    del ref
    keep = [rows, out_rows][:len(names)]
    for i in candidates:
        sx = suffixes[i]
        if sx is None:  # the whole candidate model
            pruned = remove_layers(model, [*removed, i], report=report)
            got = _run(pruned, windows, names, batch_size, threads, rows=keep)
        else:
            batch_feeds = [{**{n: f[n] for n in sx.inputs}, **{c: cached[c][k] for c in sx.cut}}
                           for k, f in enumerate(feeds)]
            got = _run(sx.materialize(model, batch_feeds[0]), windows, names, batch_size, threads,
                       rows=keep, feeds=batch_feeds)
        pairs[by_index[i].block.id] = (x, got[feature])
        if out_specs:
            acc = OutputAccumulator([sp.name for sp in out_specs])
            acc.add(lg, reference64, got[lg].astype(np.float64), True)
            outputs[by_index[i].block.id] = acc.scores()
    return predicted


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
    specs = [sp for sp in specs if not sp.output]
    if out_specs and scope != "global":
        raise InputError(f"output-level metrics ({', '.join(sp.name for sp in out_specs)}) need --scope global")
    by_index = report.by_index()
    removed = sorted(set(removed))
    candidates = [i for i in (by_index if candidates is None else candidates) if i not in removed]
    if not candidates:
        return ScoreRound(scope, feature, metrics, 0)
    lg = logits_name(model)
    if scope == "global":  # exposed before any removal: a removed last layer's norm output is handed on by name
        feature = feature or final_hidden(model)
        model = with_outputs(model, [feature])
    current = remove_layers(model, removed, report=report) if removed else model
    t0 = time.perf_counter()
    pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    outputs: dict[str, dict[str, float]] = {}
    rows = token_rows(windows.size, max_tokens, seed)
    if scope == "global":
        predicted = _global_pairs(model, current, report, windows, removed, candidates, feature, lg, rows,
                                  out_specs, reference, pairs, outputs, seed=seed, batch_size=batch_size,
                                  threads=threads)
    else:
        kept = [i for i in sorted(by_index) if i not in removed]
        entry = {}
        prev = by_index[min(by_index)].block.entry  # the embeddings: the first kept layer's entry
        for i in kept:
            entry[i] = prev
            prev = by_index[i].block.exit
        names = sorted({entry[i] for i in candidates} | {by_index[i].block.exit for i in candidates})
        act = _run(with_outputs(current, [*names, lg]), windows, [*names, lg], batch_size, threads, rows=rows)
        predicted = act[lg].argmax(-1)
        for i in candidates:
            b = by_index[i].block
            pairs[b.id] = (act[entry[i]], act[b.exit])
    ort_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    first = next(iter(pairs.values()))[0]
    conditions = make_conditions(predicted, first, seed=seed)
    table = {}
    with threadpool_limits(limits=1):
        for bid, (a, b) in pairs.items():
            table[bid] = (_score_one(specs, a.astype(np.float64), b.astype(np.float64), conditions, seed, pca_dim)
                          if specs else {})
            table[bid].update(outputs.get(bid, {}))
    positions = {by_index[i].block.id: i for i in candidates}
    ranked = consensus(table, positions, metrics, weights)
    return ScoreRound(scope, feature if scope == "global" else None, metrics, len(rows), ranked, ort_seconds,
                      time.perf_counter() - t1)
