"""Criterion benchmark (issue 13): the task measure each criterion keeps at each cut level, on six models of
different kinds, without fine-tuning and after the same short distillation budget; mean rank and regret
against a greedy oracle.

    python -m tools.bench.criteria [--shard k/n]            # no-fine-tune units (pruning runs, oracle)
    python -m tools.bench.criteria --finetune [--shard k/n] # fine-tuned condition (needs the units above)
    python -m tools.bench.criteria --table                  # markdown tables of the cached results

Models and measures: ``tools/bench/criteria_tasks.py`` (ResNet-56, ViT, post-LN encoder, pre-LN decoder on
Fashion-MNIST; ppocr_cls and minilm from the real-models corpus). Calibration: the first ``--max-samples``
(128) samples of each model's calibration folder; the tool holds a fifth back (seed 0) and scores on the rest.

One unit = one (model, criterion): an iterative pruning run (``onnx_consensus.pruner.prune``, one block kept
per stage) to the deepest level, whose removal order gives every shallower level too; then the task measure
on the test data at each level. The ``oracle`` unit is a greedy search with the same constraints: each round
it removes the candidate whose removal keeps the best task measure on the HELD-BACK part of the calibration
set (not the test set; ties: the measure's tie-break, then the earlier block). Fine-tuned condition: each
(model, level, removed set) is distilled from the original once (``onnx_consensus.finetune.job.finetune_model``,
the same ``FT_CONFIG`` for all: distillation on the 128 calibration samples, no labels) and measured again;
criteria that removed the same set share the unit.

Results are JSON under .cache/criteria/<config hash>/ (resumable: finished units are skipped; written
atomically; a changed config does not reuse stale results). Each unit records its CPU seconds (this process,
``time.process_time``), wall seconds and the machine's load average while it ran: on a shared machine wall
time is an upper bound, CPU seconds are the comparable figure. Run two shards in parallel on two cores
(``--shard 0/2`` and ``--shard 1/2``), or two unsharded workers: a unit being computed is locked
(``.lock`` beside its result, holding the worker's pid), so workers on one list share it unit by unit.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools.bench.criteria_tasks import TASKS, Task, calib_folder, evaluate  # noqa: E402
from tools.bench.harness import (BenchRow, Cost, Meter, add_shard, cache_dir as harness_cache_dir,  # noqa: E402
                                 config_key as hash_key, read_json, run_claimed, shard, write_json)

VERSION = 2
RANDOM = ("random0", "random1", "random2")
SPAN = "pruneme (angular span)"
BI = "block influence (local cosine)"
LOCAL = (BI,)  # criteria scored in the local scope (block entry vs exit); the others global


def _weighted_output(task: Task) -> dict[str, float]:
    """The weighted variant's weights: the model's output-level scores weigh 8 in all (vs 1 for each of the eight)."""
    outs = ("output_kl",) if task.class_scores else ("output_mse", "output_cosine")
    return {m: 8.0 / len(outs) for m in outs}


# name -> (--metrics, weights (dict, or a function of the task), seed, which models: all | class | noclass);
# the important ones first, so a partial run still answers
CRITERIA: dict[str, tuple] = {
    "oracle": (None, {}, 0, "all"),
    "paper": (("paper",), {}, 0, "all"),
    "output": (("output",), {}, 0, "all"),
    "paper+output (output x8)": (("paper+output",), _weighted_output, 0, "all"),
    "cka": (("cka",), {}, 0, "all"),
    "linear_1": (("linear_1",), {}, 0, "all"),
    "linear_0": (("linear_0",), {}, 0, "all"),
    "random0": (("random",), {}, 0, "all"),
    "paper+output": (("paper+output",), {}, 0, "all"),
    "output_kl+output_agreement": (("output_kl+output_agreement",), {}, 0, "class"),
    "permutation": (("permutation",), {}, 0, "all"),
    "wasserstein": (("wasserstein",), {}, 0, "all"),
    "gaussian_stochastic_0": (("gaussian_stochastic_0",), {}, 0, "all"),
    "gaussian_stochastic_1": (("gaussian_stochastic_1",), {}, 0, "all"),
    "gaussian_stochastic_2": (("gaussian_stochastic_2",), {}, 0, "all"),
    "output_agreement": (("output_agreement",), {}, 0, "class"),
    "output_mse": (("output_mse",), {}, 0, "noclass"),
    "output_cosine": (("output_cosine",), {}, 0, "noclass"),
    "random1": (("random",), {}, 1, "all"),
    "random2": (("random",), {}, 2, "all"),
    "oracle (held-back log-likelihood)": (None, {}, 0, "all"),
    # PruneMe (Gromov et al. 2024): the L consecutive blocks with the smallest angular distance between the
    # stream entering the first and leaving the last, at the last token (onnx_consensus.llm.spans); one span per
    # level, not a removal order; decoders only
    SPAN: (None, {}, 0, "decoder"),
    # ShortGPT's Block Influence (Men et al. 2024): 1 - cosine of a block's entry and exit, local scope
    BI: (("cosine",), {}, 0, "decoder"),
}
ORACLES = ("oracle", "oracle (held-back log-likelihood)")
SINGLE_PAPER = ("cka", "gaussian_stochastic_0", "gaussian_stochastic_1", "gaussian_stochastic_2", "permutation",
                "linear_0", "linear_1", "wasserstein")
# the same distillation budget for every criterion: 2 epochs over the 128 calibration samples, batch 16 (16 steps)
FT_CONFIG = {"epochs": 2, "batch_size": 16, "seed": 0, "threads": 1}
MODEL_KINDS = {"resnet56": "CNN (BN), Fashion-MNIST", "vit": "pre-LN ViT, Fashion-MNIST",
               "postln": "post-LN encoder, token sequences", "decoder": "pre-LN decoder, next token",
               "ppocr_cls": "MobileNetV3 text-orientation classifier (corpus)",
               "minilm": "BERT post-LN sentence embedding (corpus)"}


def applies(criterion: str, task: Task) -> bool:
    which = CRITERIA[criterion][3]
    if which == "decoder":
        return task.measure == "next_token"
    return which == "all" or (which == "class") == task.class_scores


def config_key(args) -> str:
    return hash_key({"version": VERSION, "tasks": {n: t.key() for n, t in TASKS.items()},
                     "max_samples": args.max_samples, "ft": FT_CONFIG})


def cache_dir(args) -> Path:
    return harness_cache_dir("criteria", config_key(args))


def cache_file(args, model: str, criterion: str) -> Path:
    return cache_dir(args) / model / (criterion.replace(" ", "_").replace("/", "_") + ".json")


def ft_file(args, model: str, removed: list[str]) -> Path:
    return cache_dir(args) / model / "finetuned" / f"{len(removed)}_{hash_key(sorted(removed), 12)}.json"


@dataclass
class UnitRow(BenchRow):
    """One (model, criterion) run without fine-tuning: the removal order, and per cut level (str) the task measure
    (percent, higher is better) and its tie-break on the test data; ``original``: the unpruned model's measure."""

    model: str
    criterion: str
    metrics: list
    weights: dict
    seed: int
    order: list
    measure: dict
    tiebreak: dict
    original: float
    kind: str
    prune: Cost
    eval: Cost
    score_samples: int | None = None  # pruning runs only (not the oracle)
    candidates_scored: int | None = None
    sets: dict | None = None  # PruneMe: the span removed at each level (str), not an order's prefix

    def __post_init__(self):
        self.prune, self.eval = Cost.of(self.prune), Cost.of(self.eval)


@dataclass
class FinetuneRow(BenchRow):
    """One (model, removed set) after the fixed distillation budget (FT_CONFIG): measure and tie-break on the test
    data (percent), the original's measure, training images seen."""

    model: str
    removed: list
    measure: float
    tiebreak: float
    original: float
    images_seen: int | None
    finetune: Cost
    eval: Cost

    def __post_init__(self):
        self.finetune, self.eval = Cost.of(self.finetune), Cost.of(self.eval)


@dataclass
class ScoreTable(BenchRow):
    """The raw scores of every benchmark metric for one scored state (``shared_scorer``), by block id."""

    scores: dict
    feature: str
    n_samples: int
    reason: str | None
    scope: str


def test_set(kind: str, n: int):
    """The first ``n`` Fashion-MNIST test images as model input (``kind``: cifar | vit) and their labels
    (kept for callers of the earlier version of this tool)."""
    from tools.data.fmnist import load_fmnist, to_cifar_input
    from tools.data.train_vit import to_vit_input

    x, y = load_fmnist("test")
    x, y = x[:n], y[:n]
    return (to_cifar_input(x) if kind == "cifar" else to_vit_input(x)), y


def accuracy(model, x, y, batch: int = 250) -> float:
    """Top-1 accuracy (%) of a one-input classifier (ModelProto or path) on x (N, ...) with labels y (N,)."""
    from onnx_consensus.runtime import make_session

    sess = make_session(model, threads=1)
    name = sess.get_inputs()[0].name
    hits = sum(int((sess.run(None, {name: x[i:i + batch]})[0].argmax(1) == y[i:i + batch]).sum())
               for i in range(0, len(x), batch))
    return 100.0 * hits / len(x)


_TEST: dict[str, tuple] = {}


def test_data(task: Task):
    """(test batches, the original model's first outputs on them, the original's measure), cached per process."""
    if task.name not in _TEST:
        import onnx

        from tools.bench.criteria_tasks import first_outputs

        batches = task.test()
        model = onnx.load(task.path)
        refs = first_outputs(model, [f for f, _ in batches])
        _TEST[task.name] = (batches, refs, evaluate(task, model, batches, refs))
    return _TEST[task.name]


def load(task: Task, args):
    import onnx

    from onnx_consensus import load_calibration

    model = onnx.load(task.path)
    return model, load_calibration(calib_folder(task), model, max_samples=args.max_samples)


def oracle_order(task: Task, model, data, depth: int, smooth: bool = False) -> list[str]:
    """Greedy oracle: each round, among the eligible candidates (the pruner's constraint: one block kept per
    stage), remove the one whose removal keeps the best task measure (then tie-break, then the earlier block)
    on the held-back fifth of the calibration data (the pruner's own split, seed 0). smooth: rank by the
    tie-break first (the mean log-likelihood of the labels / next tokens; the cosine stays first), which
    25 held-back samples resolve better than an accuracy."""
    from onnx_consensus import RunOptions, find_blocks, remove_blocks
    from tools.bench.criteria_tasks import first_outputs

    _, hold = data.split(RunOptions().holdout, seed=0)
    feeds = [f[0] for f in data.counted_batches(64, hold)]
    labels = None if data.labels is None else np.asarray(data.labels)[hold]
    targets, start = [], 0
    for f in feeds:
        n = len(next(iter(f.values())))
        targets.append(None if labels is None else labels[start:start + n])
        start += n
    batches = list(zip(feeds, targets))
    refs = first_outputs(model, feeds)
    blocks = find_blocks(model).blocks
    removed: list = []
    for _ in range(depth):
        gone = {b.id for b in removed}
        left: dict[int, int] = {}
        for b in blocks:
            if b.id not in gone:
                left[b.stage] = left.get(b.stage, 0) + 1
        eligible = [b for b in blocks if b.id not in gone and left[b.stage] > 1]
        if not eligible:
            break
        def key(b):
            value, tie = evaluate(task, remove_blocks(model, removed + [b]), batches, refs)
            return (tie, value, -b.position) if smooth and task.measure != "cosine" else (value, tie, -b.position)

        best = max(eligible, key=key)
        removed.append(best)
    return [b.id for b in removed]


def shared_scorer(args, task: Task, original):
    """A drop-in for ``pruner.score_blocks`` that computes, for each scored state (the current model's nodes
    and the candidates), the raw scores of EVERY deterministic metric of the benchmark at once (the eight,
    and the output-level scores that fit the model, against the original model's outputs), caches them on
    disk under the config hash, and orders the candidates for the asked metrics and weights with the tool's
    own ``consensus``. The raw scores are the ones a run with only the asked metrics computes (same features,
    conditions, PCA cap and reference outputs), so the orders are too; criteria whose paths share a state
    (every first round, and common prefixes) compute it once. ``random`` goes to the tool unchanged."""
    from onnx_consensus import scoring
    from onnx_consensus.consensus import consensus
    from onnx_consensus.metrics import resolve_metrics

    every = resolve_metrics(("paper", "output_kl", "output_agreement") if task.class_scores
                            else ("paper", "output_mse", "output_cosine"), task.class_scores)
    folder = cache_dir(args) / task.name / "scores"
    refs: dict = {}

    def score(model, data, *, blocks=None, metrics=(), weights=None, reference=None, settings=None, **kw):
        names = {f.name for f in dataclasses.fields(scoring.ScoreSettings)}
        kw["settings"] = st = (settings or scoring.ScoreSettings()).with_options(
            {k: kw.pop(k) for k in list(kw) if k in names})
        if blocks is None or not set(metrics) <= set(every):
            return scoring.score_blocks(model, data, blocks=blocks, metrics=metrics, weights=weights,
                                        reference=reference, **kw)
        state = [sorted(o for n in model.graph.node for o in n.output), [b.id for b in blocks], st.seed]
        path = folder / (hash_key(state, 16) + ".json")
        tab = ScoreTable.load(path)
        if tab is None:
            if reference is None:
                key = tuple(np.asarray(kw["indices"]).tolist())
                if key not in refs:
                    refs[key] = scoring.original_outputs(original, data, kw["indices"], batch_size=st.batch_size,
                                                         threads=st.threads)
                reference = refs[key]
            rnd = scoring.score_blocks(model, data, blocks=blocks, metrics=every, reference=reference, **kw)
            tab = ScoreTable({b.id: b.scores for b in rnd.blocks}, rnd.feature, rnd.n_samples, rnd.feature_reason,
                             rnd.scope)
            write_json(path, tab)
        ranked = consensus({b.id: {m: tab.scores[b.id][m] for m in metrics} for b in blocks},
                           {b.id: b.position for b in blocks}, metrics, weights)
        return scoring.ScoreRound(tab.scope, tab.feature, tuple(metrics), tab.n_samples, ranked,
                                  feature_reason=tab.reason)
    return score


def run_unit(args, task: Task, criterion: str) -> UnitRow:
    from onnx_consensus import CriterionOptions, RunOptions, TargetOptions, find_blocks, remove_blocks
    from onnx_consensus.pruner import prune

    metrics, weights, seed, _ = CRITERIA[criterion]
    weights = weights(task) if callable(weights) else weights
    model, data = load(task, args)
    depth = max(task.levels)
    extra = {}
    sets = None
    with Meter() as prune_meter:
        if criterion == SPAN:
            sets = span_sets(task, model, data)
            order = sets[str(depth)]
        elif metrics is None:
            order = oracle_order(task, model, data, depth, smooth=criterion != "oracle")
        else:
            from onnx_consensus import pruner

            saved = pruner.score_blocks
            pruner.score_blocks = shared_scorer(args, task, model)
            try:
                res = prune(model, data, criterion=CriterionOptions(metrics=metrics, weights=weights, seed=seed,
                                                                    scope="local" if criterion in LOCAL else "global"),
                            target=TargetOptions(remove=depth), run=RunOptions(threads=1))
            finally:
                pruner.score_blocks = saved
            order = res.removed_ids
            extra = {"score_samples": res.score_samples, "candidates_scored": sum(len(r.blocks) for r in res.rounds)}
    with Meter() as eval_meter:
        batches, refs, original = test_data(task)
        blocks = find_blocks(model).by_id()
        measure = {str(L): evaluate(task, remove_blocks(model, [blocks[i] for i in removed_at(
            {"order": order, "sets": sets}, L)]), batches, refs) for L in task.levels}
    if sets is not None:
        extra["sets"] = sets
    return UnitRow(task.name, criterion, list(metrics or ()), weights, seed, order,
                   {L: m[0] for L, m in measure.items()}, {L: m[1] for L, m in measure.items()}, original[0],
                   task.measure, prune_meter.record(), eval_meter.record(), **extra)


def span_sets(task: Task, model, data) -> dict[str, list[str]]:
    """PruneMe at each level L: the L consecutive blocks (stack order; the blocks chain, each one's exit the
    next one's entry) whose first entry and last exit are the closest in angle at the last token, on the
    scoring part of the calibration data (the pruner's split, seed 0); at least one block stays."""
    from onnx_consensus.graph.blocks import find_blocks
    from onnx_consensus.llm.spans import best_span, stream_states
    from onnx_consensus.options import RunOptions

    blocks = sorted(find_blocks(model).blocks, key=lambda b: b.position)
    assert all(a.exit == b.entry for a, b in zip(blocks, blocks[1:])), "the blocks do not chain"
    score, _ = data.split(RunOptions().holdout, seed=0)
    feeds = (f for f, _ in data.counted_batches(64, score))
    states = stream_states(model, [blocks[0].entry] + [b.exit for b in blocks], feeds, threads=1)
    return {str(L): [b.id for b in blocks[best_span(states, L).start:][:L]] for L in task.levels}


def removed_at(result, level: int) -> list[str]:
    """The blocks a unit's criterion removed at ``level`` (a UnitRow, or a dict with order/sets): its span there
    (PruneMe), else its order's prefix."""
    sets = result.get("sets") if isinstance(result, dict) else result.sets
    order = result["order"] if isinstance(result, dict) else result.order
    return sets[str(level)] if sets else order[:level]


def run_finetune(args, task: Task, removed: list[str]) -> FinetuneRow:
    from onnx_consensus import FinetuneConfig, find_blocks, remove_blocks
    from onnx_consensus.finetune.job import finetune_model

    model, data = load(task, args)
    data.labels = None  # distillation from the original, whatever labels the folder has
    blocks = find_blocks(model).by_id()
    student = remove_blocks(model, [blocks[i] for i in removed])
    with Meter() as m:
        tuned, info = finetune_model(student, data, config=FinetuneConfig(**FT_CONFIG), teacher=model,
                                     progress=False, threads=1)
    with Meter() as e:
        batches, refs, original = test_data(task)
        value, tie = evaluate(task, tuned, batches, refs)
    return FinetuneRow(task.name, removed, value, tie, original[0], info.get("images_seen"), m.record(), e.record())


def units(args) -> list[tuple[str, str]]:
    models = args.models.split(",")
    return shard([(m, c) for c in args.criteria.split(",") for m in models if applies(c, TASKS[m])], args.shard)


def ft_jobs(args) -> list[tuple[str, list[str]]]:
    """Distinct (model, removed set) of the cached no-fine-tune units, in unit order."""
    seen, jobs = set(), []
    for m, c in units(argparse.Namespace(**{**vars(args), "shard": None})):
        r = UnitRow.load(cache_file(args, m, c))
        if r is None:
            continue
        for L in TASKS[m].levels:
            key = (m, tuple(sorted(removed_at(r, L))))
            if key not in seen:
                seen.add(key)
                jobs.append((m, removed_at(r, L)))
    return shard(jobs, args.shard)


# ---------------------------------------------------------------------------------------------- tables

def collect(args, finetuned: bool) -> tuple[dict, list, dict]:
    """rows[criterion][(model, level)] = measure; the columns; originals per model."""
    rows: dict[str, dict] = {}
    originals: dict[str, float] = {}
    for c in CRITERIA:
        for m, task in TASKS.items():
            r = UnitRow.load(cache_file(args, m, c)) if applies(c, task) else None
            if r is None:
                continue
            originals[m] = r.original
            for L in task.levels:
                if finetuned:
                    f = FinetuneRow.load(ft_file(args, m, removed_at(r, L)))
                    if f is None:
                        continue
                    rows.setdefault(c, {})[(m, str(L))] = f.measure
                else:
                    rows.setdefault(c, {})[(m, str(L))] = r.measure[str(L)]
    rnd = [rows.pop(k) for k in RANDOM if k in rows]
    if rnd:  # per column, the mean over the seeds measured there
        cols = set.union(*(set(r) for r in rnd))
        rows[f"random (mean of up to {len(rnd)} seeds)" if len(rnd) > 1 else "random (seed 0)"] = {
            k: float(np.mean([r[k] for r in rnd if k in r])) for k in cols}
    cols = [(m, str(L)) for m, t in TASKS.items() for L in t.levels]
    return rows, cols, originals


def rank_table(rows: dict, cols: list) -> dict[str, dict]:
    """Per column, each criterion's rank (1 = best; ties share the mean rank; the oracles are not ranked) and
    its regret (the oracle's measure minus the criterion's). Ranks are taken among the criteria measured in
    every column (the "complete" ones); a criterion measured in only some columns (one that applies only to
    some models, or not finished) is ranked against the complete ones alone, so it shifts no one's rank. With no
    complete criterion at all (a partial run), every column ranks the criteria measured in it."""
    ranked = [c for c in rows if c not in ORACLES]
    complete = [c for c in ranked if all(col in rows[c] for col in cols)]
    out: dict[str, dict] = {c: {"ranks": {}, "regret": {}} for c in rows}
    for col in cols:
        for c in ranked:
            if col not in rows[c]:
                continue
            # no complete row yet (a partial run): rank among every criterion measured in this column
            field = set(complete) | {c} if complete else {o for o in ranked if col in rows[o]}
            vals = [round(rows[o][col], 6) for o in field]
            mine = round(rows[c][col], 6)
            out[c]["ranks"][col] = 1 + sum(v > mine for v in vals) + (sum(v == mine for v in vals) - 1) / 2
        for c in rows:
            if c != "oracle" and col in rows[c] and col in rows.get("oracle", {}):
                out[c]["regret"][col] = rows["oracle"][col] - rows[c][col]
    return out


def complete(rows: dict, cols: list, ranks: dict) -> list[str]:
    """The ranked criteria (not the oracles) measured in every column."""
    return [c for c in rows if c not in ORACLES and len(ranks[c]["ranks"]) == len(cols)]


def markdown(rows: dict, cols: list, originals: dict, title: str) -> str:
    ranks = rank_table(rows, cols)
    full = complete(rows, cols, ranks)

    def mean_rank(c):
        r = ranks.get(c, {}).get("ranks", {})
        return float(np.mean(list(r.values()))) if r else float("nan")

    def regret(c):
        r = ranks.get(c, {}).get("regret", {})
        return float(np.mean(list(r.values()))) if r else float("nan")

    head = ("| criterion | " + " | ".join(f"{m} -{L}" for m, L in cols) + " | mean rank | regret (pp) |")
    lines = [f"**{title}**", "", head, "|---|" + "---:|" * (len(cols) + 2)]
    lines.append("| original | " + " | ".join(f"{originals.get(m, float('nan')):.1f}" for m, _ in cols) + " | | |")
    order = sorted(rows, key=lambda c: (c not in ORACLES, c not in full, mean_rank(c), c))
    for c in order:
        cells = [f"{rows[c][col]:.1f}" if col in rows[c] else "" for col in cols]
        if c in ORACLES:
            mr = ""
            rg = "" if c == "oracle" else f"{regret(c):.1f}"
        else:
            n = len(ranks[c]["ranks"])
            mr = f"{mean_rank(c):.2f}" + ("" if n == len(cols) else f" ({n}/{len(cols)} cols)")
            rg = f"{regret(c):.1f}"
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {mr} | {rg} |")
    return "\n".join(lines)


def summary(rows: dict, cols: list) -> dict:
    ranks = rank_table(rows, cols)
    return {c: {"mean_rank": float(np.mean(list(v["ranks"].values()))) if v["ranks"] else None,
                "regret": float(np.mean(list(v["regret"].values()))) if v["regret"] else None,
                "columns": len(v["ranks"])} for c, v in ranks.items()}


def best_share(rows: dict, cols: list, n: int = 2000, seed: int = 0) -> dict[str, float]:
    """How sure the "best mean rank" call is: over ``n`` resamples of the columns (with replacement), the share
    in which each complete criterion has the best mean rank (ties split). Columns are the unit resampled (model x
    level), so it says how much the call rests on a few columns, not on test-sample noise."""
    ranks = rank_table(rows, cols)
    full = complete(rows, cols, ranks)
    if not full:
        return {}
    table = np.array([[ranks[c]["ranks"][col] for col in cols] for c in full])  # (criteria, columns)
    rng = np.random.default_rng(seed)
    wins = np.zeros(len(full))
    for _ in range(n):
        mean = table[:, rng.integers(0, len(cols), len(cols))].mean(1)
        best = np.isclose(mean, mean.min())
        wins += best / best.sum()
    return {c: float(w / n) for c, w in zip(full, wins)}


def cost(args) -> str:
    """Total CPU and wall seconds of the cached units, and the load averages seen."""
    cpu = wall = 0.0
    loads: list[float] = []
    n = nf = 0
    for p in cache_dir(args).rglob("*.json"):
        r = read_json(p)  # units, fine-tuned units and score tables: the units carry their costs
        for k in ("prune", "eval", "finetune"):
            if k in r:
                c = Cost.of(r[k])
                cpu += c.cpu_seconds
                wall += c.wall_seconds
                loads += list(c.loadavg)
        n += "prune" in r
        nf += "finetune" in r
    lo, hi = (min(loads), max(loads)) if loads else (float("nan"),) * 2
    return (f"{n} pruning/oracle units and {nf} fine-tuning units: {cpu:.0f} CPU seconds, {wall:.0f} wall seconds "
            f"summed over units (two shards ran in parallel), 1-minute load average {lo:.1f}-{hi:.1f} on 2 cores")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shard(ap)
    ap.add_argument("--max-samples", type=int, default=128, help="calibration samples (the last 20%% held back)")
    ap.add_argument("--models", default=",".join(TASKS))
    ap.add_argument("--criteria", default=",".join(CRITERIA), help="which criteria, in this order")
    ap.add_argument("--finetune", action="store_true", help="run the fine-tuned condition's units")
    ap.add_argument("--table", action="store_true", help="print the tables of cached results and exit")
    ap.add_argument("--json", default=None, help="with --table: also write the summary (mean ranks, regret) here")
    args = ap.parse_args(argv)
    if args.table:
        out = {}
        for ft, title in ((False, "No fine-tuning"), (True, "After distillation (same budget for all)")):
            rows, cols, originals = collect(args, ft)
            if rows:
                print(markdown(rows, cols, originals, title) + "\n")
                share = sorted(best_share(rows, cols).items(), key=lambda kv: -kv[1])
                print(f"Best mean rank over 2,000 resamples of the {len(cols)} columns: "
                      + ", ".join(f"{c} {v:.0%}" for c, v in share if v >= 0.01) + "\n")
                out["finetuned" if ft else "no_finetune"] = summary(rows, cols)
                out["best_share_finetuned" if ft else "best_share_no_finetune"] = dict(share)
        print(cost(args))
        if args.json:
            write_json(Path(args.json), out)
        return 0
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.finetune:
        jobs = ((ft_file(args, m, removed), partial(run_finetune, args, TASKS[m], removed))
                for m, removed in ft_jobs(args))
        for r in run_claimed(jobs):
            print(f"finetune {r.model} -{len(r.removed)}: {r.measure:.2f} ({r.finetune.cpu_seconds:.0f} cpu s)",
                  flush=True)
        return 0
    for r in run_claimed((cache_file(args, m, c), partial(run_unit, args, TASKS[m], c)) for m, c in units(args)):
        print(f"{r.model} {r.criterion}: {r.measure} (prune {r.prune.cpu_seconds:.0f} cpu s, "
              f"{r.prune.wall_seconds:.0f} wall s, load {r.prune.loadavg})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
