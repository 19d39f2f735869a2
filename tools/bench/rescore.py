"""`--rescore-top K` against full re-scoring (issue 13), on the criterion benchmark's models and data: how
often the iterative schedule's choices change, and the work saved.

    python -m tools.bench.rescore [--criterion output] [--ks 3,5,8] [--models resnet56,vit,...] [--shard k/n]
    python -m tools.bench.rescore --table [--criterion output]

The full run (every eligible candidate re-scored after each removal) is the criterion's unit of
tools/bench/criteria.py (same model, calibration samples, depth); run that first. For each model and K, one
iterative run to the model's deepest level with ``rescore_top=K`` (scored through the benchmark's shared
scorer, so its first round, the same for every K, is the full run's cached one). Reported per K: the (model, level) runs whose
removed set differs from the full run's at that level ("picks changed", the issue's < 5 % bar), the rounds whose
pick differs, and the candidates scored against the full runs' (each candidate scored is one suffix run over the
calibration data, the cost of a round; CPU seconds are not compared because the runs share cached rounds). Cached as
JSON under .cache/rescore/<benchmark config hash>/ (resumable, written atomically).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools.bench import criteria as bc  # noqa: E402
from tools.bench.criteria_tasks import TASKS  # noqa: E402
from tools.bench.harness import BenchRow, Cost, Meter, add_shard, cache_dir, run_claimed, shard  # noqa: E402


@dataclass
class RescoreRow(BenchRow):
    """One (model, K) run of ``--rescore-top K``: the removal order, the candidates scored over all rounds and
    what the pruning cost."""

    model: str
    criterion: str
    k: int
    order: list
    candidates_scored: int
    prune: Cost

    def __post_init__(self):
        self.prune = Cost.of(self.prune)


def cache_file(args, model: str, k: int) -> Path:
    return cache_dir("rescore", bc.config_key(args)) / model / f"{args.criterion.replace(' ', '_')}_{k}.json"


def run(args, model: str, k: int) -> RescoreRow:
    from onnx_consensus import CriterionOptions, RunOptions, TargetOptions
    from onnx_consensus.pruner import prune

    task = TASKS[model]
    metrics, weights, seed, _ = bc.CRITERIA[args.criterion]
    weights = weights(task) if callable(weights) else weights
    onnx_model, data = bc.load(task, args)
    from onnx_consensus import pruner

    saved = pruner.score_blocks
    pruner.score_blocks = bc.shared_scorer(args, task, onnx_model)  # the first round is the full run's
    try:
        with Meter() as m:
            res = prune(onnx_model, data, criterion=CriterionOptions(metrics=metrics, weights=weights, seed=seed,
                                                                     rescore_top=k),
                        target=TargetOptions(remove=max(task.levels)), run=RunOptions(threads=1))
    finally:
        pruner.score_blocks = saved
    return RescoreRow(model, args.criterion, k, res.removed_ids, sum(len(r.blocks) for r in res.rounds), m.record())


def table(args) -> tuple[str, dict]:
    lines = ["| K | runs with picks changed (model x level) | rounds with a different pick | candidates scored "
             "| models |", "|---:|---:|---:|---:|---|"]
    summary = {}
    models = args.models.split(",")
    full = {}
    for m in models:
        row = bc.UnitRow.load(bc.cache_file(args, m, args.criterion))
        if row is not None:
            full[m] = row
    tot_full = {"scored": sum(full[m].candidates_scored for m in full),
                "cpu": sum(full[m].prune.cpu_seconds for m in full)}
    lines.append(f"| all | 0 / {sum(len(TASKS[m].levels) for m in full)} | 0 | {tot_full['scored']} | "
                 f"{', '.join(full)} |")
    for k in [int(v) for v in args.ks.split(",")]:
        runs = changed = rounds = rounds_diff = scored = scored_full = 0
        cpu = cpu_full = 0.0
        done = []
        for m in full:
            r, f = RescoreRow.load(cache_file(args, m, k)), full[m]
            if r is None:
                continue
            done.append(m)
            for L in TASKS[m].levels:
                runs += 1
                changed += set(r.order[:L]) != set(f.order[:L])
            rounds += len(f.order)
            rounds_diff += sum(a != b for a, b in zip(r.order, f.order))
            scored += r.candidates_scored
            scored_full += f.candidates_scored
            cpu += r.prune.cpu_seconds
            cpu_full += f.prune.cpu_seconds
        if not done:
            continue
        summary[k] = {"runs": runs, "changed": changed, "rounds": rounds, "rounds_changed": rounds_diff,
                      "scored": scored, "scored_full": scored_full, "cpu": cpu, "cpu_full": cpu_full, "models": done}
        lines.append(f"| {k} | {changed} / {runs} ({changed / runs:.0%}) | {rounds_diff} / {rounds} | "
                     f"{scored} of {scored_full} ({1 - scored / scored_full:.0%} fewer) | {', '.join(done)} |")
    ok = [k for k, s in sorted(summary.items()) if s["changed"] / s["runs"] < 0.05 and len(s["models"]) == len(models)]
    choice = ok[0] if ok else "all"
    return "\n".join(lines) + f"\n\nDefault by the < 5 % rule: {choice}", summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--criterion", default="output", help="a criterion name of tools/bench/criteria.py")
    ap.add_argument("--ks", default="3,5,8")
    ap.add_argument("--models", default=",".join(TASKS))
    ap.add_argument("--max-samples", type=int, default=128)
    add_shard(ap, "runs")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args)[0])
        return 0
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    jobs = shard([(m, int(k)) for k in args.ks.split(",") for m in args.models.split(",")], args.shard)
    for r in run_claimed((cache_file(args, m, k), partial(run, args, m, k)) for m, k in jobs):
        print(f"{r.model} K={r.k}: {r.candidates_scored} scored, {r.prune.wall_seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
