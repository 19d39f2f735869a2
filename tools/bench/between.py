"""Table 1 under the published protocol (issue 13, item 2): fine-tune between removals, then re-score.

    python -m tools.bench.between [--shard k/n] [--steps 50] [--max-samples 128] [--test-images 2000]
    python -m tools.bench.between --table        # the markdown table of the cached results

The published code fine-tunes after every removal before it scores the remaining blocks again; Table 1 of
docs/BENCHMARKS.md re-scores the un-fine-tuned model each round. Here each criterion prunes the shipped
ResNet-56 iteratively (one block kept per stage, the first ``--max-samples`` calibration images, 20 % of them
held back), with ``--steps`` optimiser steps of supervised fine-tuning (batch ``--batch``, the bridge's recipe,
on the shipped 6,000 training PNGs of examples/fmnist_train) after each removal, before the next scoring
round: ``onnx-cprune --finetune-between N`` (``finetune.between.between_removals``). At each level L (5 and 10 blocks)
the top-1 accuracy on the first ``--test-images`` shipped test PNGs (examples/fmnist_test) is measured twice:

- ``removed``: right after the L-th removal (the model has been fine-tuned after removals 1..L-1);
- ``tuned``: after the same N steps once more, i.e. the model the protocol hands on after the L-th removal.

Test images never choose anything (no epoch is picked, the order depends on calibration scores only). One
unit = one criterion, cached as JSON under .cache/between/<config hash>/ (resumable; a changed config does not
reuse stale results). Run two shards in parallel on two cores (``--shard 0/2`` and ``--shard 1/2``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools.bench.harness import (BenchRow, add_shard, cache_dir, config_key, read_json, shard,  # noqa: E402
                                 write_json)

MODEL = "models/resnet56_fmnist.onnx"
CALIB, TRAIN, TEST = "examples/fmnist_calib", "examples/fmnist_train", "examples/fmnist_test"
MEAN, STD = (0.286,), (0.353,)  # the PNGs' normalisation, as the calibration .npy was made
LEVELS = (5, 10)
# the published Consensus first, then its eight members, the output KL against the original model, and the
# fine-tuned condition's default (paper+output)
CRITERIA = ("paper", "output_kl", "cka", "linear_1", "linear_0", "permutation", "gaussian_stochastic_0",
            "gaussian_stochastic_1", "gaussian_stochastic_2", "wasserstein", "paper+output")
MEMBERS = ("cka", "gaussian_stochastic_0", "gaussian_stochastic_1", "gaussian_stochastic_2", "permutation",
           "linear_0", "linear_1", "wasserstein")


def cache_file(args, criterion: str) -> Path:
    key = config_key({"model": MODEL, "levels": LEVELS, "steps": args.steps, "batch": args.batch,
                      "max_samples": args.max_samples, "test_images": args.test_images, "lr": args.lr})
    return cache_dir("between", key) / f"{criterion}.json"


@dataclass
class BetweenRow(BenchRow):
    """One criterion's iterative run with fine-tuning between removals: the removal order; per level (str) test
    top-1 (%) right after the L-th removal ("removed") and after the steps that follow it ("tuned"); the original's
    top-1; seconds spent pruning (scoring included) and fine-tuning."""

    criterion: str
    order: list
    accuracy: dict
    original: float
    prune_seconds: float
    finetune_seconds: float
    score_samples: int
    steps: int
    batch: int


def run_unit(args, criterion: str) -> BetweenRow:
    """One iterative run of ``criterion`` to max(LEVELS) removals with ``args.steps`` fine-tuning steps after
    each removal; {order, accuracy: {level: {removed, tuned}} (percent), original, seconds}."""
    import onnx

    from onnx_consensus import ImageOptions, load_calibration
    from onnx_consensus import CriterionOptions, FinetuneConfig, RunOptions, TargetOptions
    from onnx_consensus.pruner import prune
    from onnx_consensus.finetune.between import between_removals
    from onnx_consensus.finetune.evaluator import evaluator

    model = onnx.load(ROOT / MODEL)
    images = ImageOptions(mean=MEAN, std=STD)
    calib = load_calibration(ROOT / CALIB, model, max_samples=args.max_samples)
    train = load_calibration(ROOT / TRAIN, model, image_options=images)
    test = load_calibration(ROOT / TEST, model, image_options=images)
    idx = np.arange(min(args.test_images, test.n_samples))
    acc = evaluator(model, test, indices=idx, threads=1)
    config = FinetuneConfig(epochs=1, batch_size=args.batch, lr=args.lr, threads=1)
    tune = between_removals(model, train, config=config, steps=args.steps)
    levels: dict[str, dict[str, float]] = {}
    count = [0]
    tune_seconds = [0.0]

    def timed_tune(m: onnx.ModelProto) -> onnx.ModelProto:
        t = time.perf_counter()
        out = tune(m)
        tune_seconds[0] += time.perf_counter() - t
        return out

    def hook(m: onnx.ModelProto) -> onnx.ModelProto:
        count[0] += 1
        tuned = timed_tune(m)
        if count[0] in LEVELS:
            levels[str(count[0])] = {"removed": 100 * acc(m), "tuned": 100 * acc(tuned)}
        return tuned

    t0 = time.perf_counter()
    res = prune(model, calib, criterion=CriterionOptions(metrics=(criterion,)),
                target=TargetOptions(remove=max(LEVELS)), run=RunOptions(threads=1), between=hook)
    seconds = time.perf_counter() - t0
    last = res.model  # the pruner calls the hook after every removal but the last
    levels[str(max(LEVELS))] = {"removed": 100 * acc(last), "tuned": 100 * acc(timed_tune(last))}
    return BetweenRow(criterion, res.removed_ids, levels, 100 * acc.original_metric, round(seconds, 1),
                      round(tune_seconds[0], 1), res.score_samples, args.steps, args.batch)


# between criterion -> the tools/bench/criteria.py unit with the same --metrics on this classifier
CRITERIA_UNIT = {"output_kl": "output"}


def no_finetune(args, criteria) -> dict[str, dict[str, float]]:
    """Top-1 (%) on the same test images after the first L removals of each criterion's order WITHOUT training
    between removals: the orders ``tools/bench/criteria.py`` cached for resnet56 (same model, the same first
    ``--max-samples`` calibration images and schedule). {criterion: {level: top-1}}; criteria it has not run
    are left out. Cached beside the units (keyed by the orders)."""
    import onnx

    from onnx_consensus import ImageOptions, find_blocks, load_calibration, remove_blocks
    from onnx_consensus.finetune.evaluator import evaluator
    from tools.bench import criteria as bc

    ns = argparse.Namespace(max_samples=args.max_samples)
    orders = {}
    for c in criteria:
        unit = bc.UnitRow.load(bc.cache_file(ns, "resnet56", CRITERIA_UNIT.get(c, c)))
        if unit is not None:
            orders[c] = unit.order
    cache = cache_file(args, "_no_finetune")
    cached = read_json(cache) or {}  # {criterion: {"order": removal order, "top1": {level: top-1 %}}}
    if all(c in cached and cached[c]["order"] == o[:max(LEVELS)] for c, o in orders.items()):
        return {c: cached[c]["top1"] for c in orders}
    model = onnx.load(ROOT / MODEL)
    test = load_calibration(ROOT / TEST, model, image_options=ImageOptions(mean=MEAN, std=STD))
    acc = evaluator(model, test, indices=np.arange(min(args.test_images, test.n_samples)), threads=1)
    blocks = find_blocks(model).by_id()
    out = {c: {"order": o[:max(LEVELS)], "top1": {str(L): 100 * acc(remove_blocks(model, [blocks[i] for i in o[:L]]))
                                                   for L in LEVELS}} for c, o in orders.items()}
    write_json(cache, out)
    return {c: v["top1"] for c, v in out.items()}


def table(args) -> str:
    """Markdown: one row per cached criterion, test top-1 at each level without training between removals
    (``no_finetune``), right after the L-th removal and after the steps that follow it."""
    rows = {c: r for c in CRITERIA if (r := BetweenRow.load(cache_file(args, c))) is not None}
    if not rows:
        return "(no cached results)"
    plain = no_finetune(args, list(rows))
    original = next(iter(rows.values())).original
    head = ("| criterion | " + " | ".join(f"{L}, no fine-tuning | {L} removed | {L} + {args.steps} steps"
                                         for L in LEVELS) + " | run seconds (fine-tuning) |")
    lines = [head, "|---|" + "---:|" * (3 * len(LEVELS) + 1),
             f"| original | {original:.2f} |" + " |" * (3 * len(LEVELS))]
    for c, r in rows.items():
        cells = [f"{plain[c][str(L)]:.2f}" if c in plain else "" for L in LEVELS]
        cells = [x for i, L in enumerate(LEVELS)
                 for x in (cells[i], *(f"{r.accuracy[str(L)][k]:.2f}" for k in ("removed", "tuned")))]
        name = "Consensus (`paper`)" if c == "paper" else f"`{c}`"
        seconds = f"{r.prune_seconds:.0f} ({r.finetune_seconds:.0f})"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seconds} |")

    def top1(c: str, L: int, k: str) -> float | None:
        return plain.get(c, {}).get(str(L)) if k == "no fine-tuning" else rows[c].accuracy[str(L)][k]

    if "paper" in rows:
        lines.append("")
        for L in LEVELS:
            for k in ("no fine-tuning", "removed", "tuned"):
                p = top1("paper", L, k)
                members = {c: top1(c, L, k) for c in MEMBERS if c in rows and top1(c, L, k) is not None}
                if p is None:
                    continue
                if not members:
                    continue
                beaten = [c for c, a in members.items() if p > a]
                best = max(members, key=members.get)
                lines.append(f"- {L} blocks, {k}: the Consensus ({p:.2f}) beats {len(beaten)} of {len(members)} "
                             f"members; best member `{best}` {members[best]:.2f} ({p - members[best]:+.2f} pp)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shard(ap, "criteria")
    ap.add_argument("--steps", type=int, default=50, help="fine-tuning steps after each removal")
    ap.add_argument("--batch", type=int, default=64, help="fine-tuning batch size")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the bridge's recipe)")
    ap.add_argument("--max-samples", type=int, default=128, help="calibration samples (the last 20%% held back)")
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--criteria", default=",".join(CRITERIA), help="which criteria, in this order")
    ap.add_argument("--table", action="store_true", help="print the table of cached results and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args))
        return 0
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for c in shard(args.criteria.split(","), args.shard):
        p = cache_file(args, c)
        if p.exists():
            continue
        t0 = time.time()
        r = run_unit(args, c)
        write_json(p, r)
        print(f"{c}: {r.accuracy} ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
