"""Criterion benchmark (issue 13), reduced: test accuracy without fine-tuning of the models each criterion
prunes, on the shipped ResNet-56 and ViT at two cut levels.

    python -m tools.bench_criteria [--shard k/n] [--max-samples 128] [--test-images 2000]
    python -m tools.bench_criteria --table      # the markdown table of the cached results

One unit = one (model, criterion): an iterative pruning run to the deepest level (one block kept per stage,
the calibration set's last 20 % held back), whose removal order gives every shallower level too; then the
top-1 accuracy on the first ``--test-images`` Fashion-MNIST test images at each level. Results are cached
as JSON under .cache/criteria/<config hash>/ (resumable: finished units are skipped; a changed config
does not reuse stale results). Run two shards in parallel on two cores (``--shard 0/2``, ``--shard 1/2``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {  # name -> (model, calibration folder, levels, test input converter)
    "resnet56": ("models/resnet56_fmnist.onnx", "examples/fmnist_calib", (5, 10), "cifar"),
    "vit": ("models/vit_fmnist.onnx", "examples/fmnist_vit_calib", (3, 6), "vit"),
}
# name -> (--metrics, --weights, seed); the important ones first, so a partial run still answers
CRITERIA = {
    "paper": (("paper",), {}, 0),
    "output_kl": (("output_kl",), {}, 0),
    "paper+output_kl+output_agreement": (("paper+output_kl+output_agreement",), {}, 0),
    "output_kl+output_agreement": (("output_kl+output_agreement",), {}, 0),
    "paper+output_kl+output_agreement (kl x8)": (("paper+output_kl+output_agreement",), {"output_kl": 8.0}, 0),
    "cka": (("cka",), {}, 0),
    "linear_1": (("linear_1",), {}, 0),
    "linear_0": (("linear_0",), {}, 0),
    "output_agreement": (("output_agreement",), {}, 0),
    "random0": (("random",), {}, 0),
    "random1": (("random",), {}, 1),
    "random2": (("random",), {}, 2),
    "permutation": (("permutation",), {}, 0),
    "wasserstein": (("wasserstein",), {}, 0),
    "gaussian_stochastic_0": (("gaussian_stochastic_0",), {}, 0),
    "gaussian_stochastic_1": (("gaussian_stochastic_1",), {}, 0),
    "gaussian_stochastic_2": (("gaussian_stochastic_2",), {}, 0),
}


def config_key(args) -> str:
    blob = json.dumps({"models": MODELS, "max_samples": args.max_samples, "test_images": args.test_images},
                      sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:10]


def cache_file(args, model: str, criterion: str) -> Path:
    d = ROOT / ".cache" / "criteria" / config_key(args) / model
    d.mkdir(parents=True, exist_ok=True)
    return d / (criterion.replace(" ", "_").replace("/", "_") + ".json")


def test_set(kind: str, n: int):
    from tools.fmnist import load_fmnist, to_cifar_input
    from tools.train_vit import to_vit_input

    x, y = load_fmnist("test")
    x, y = x[:n], y[:n]
    return (to_cifar_input(x) if kind == "cifar" else to_vit_input(x)), y


def accuracy(model, x, y, batch: int = 250) -> float:
    from onnx_consensus.runtime import make_session

    sess = make_session(model, threads=1)
    name = sess.get_inputs()[0].name
    hits = sum(int((sess.run(None, {name: x[i:i + batch]})[0].argmax(1) == y[i:i + batch]).sum())
               for i in range(0, len(x), batch))
    return 100.0 * hits / len(x)


def run_unit(args, model_name: str, criterion: str) -> dict:
    import onnx

    from onnx_consensus.data import load_calibration
    from onnx_consensus.graph.blocks import find_blocks
    from onnx_consensus.graph.surgery import remove_blocks
    from onnx_consensus.options import CriterionOptions, RunOptions, TargetOptions
    from onnx_consensus.pruner import prune

    path, calib, levels, kind = MODELS[model_name]
    metrics, weights, seed = CRITERIA[criterion]
    model = onnx.load(ROOT / path)
    data = load_calibration(ROOT / calib, model, max_samples=args.max_samples)
    t0 = time.perf_counter()
    res = prune(model, data, criterion=CriterionOptions(metrics=metrics, weights=weights, seed=seed),
                target=TargetOptions(remove=max(levels)), run=RunOptions(threads=1))
    seconds = time.perf_counter() - t0
    x, y = test_set(kind, args.test_images)
    blocks = find_blocks(model).by_id()
    acc = {str(L): accuracy(remove_blocks(model, [blocks[i] for i in res.removed_ids[:L]]), x, y) for L in levels}
    return {"model": model_name, "criterion": criterion, "metrics": list(metrics), "weights": weights, "seed": seed,
            "order": res.removed_ids, "accuracy": acc, "original": accuracy(model, x, y),
            "prune_seconds": round(seconds, 1), "score_samples": res.score_samples}


def table(args) -> str:
    rows, cols = {}, []
    for m, (_, _, levels, _) in MODELS.items():
        for L in levels:
            cols.append((m, str(L)))
    originals = {}
    for c in CRITERIA:
        for m in MODELS:
            p = cache_file(args, m, c)
            if p.exists():
                r = json.loads(p.read_text())
                originals[m] = r["original"]
                for L, a in r["accuracy"].items():
                    rows.setdefault(c, {})[(m, L)] = a
    # rank per column among the criteria that have it (random seeds averaged into one row first)
    rnd = [rows.pop(k) for k in ("random0", "random1", "random2") if k in rows]
    if rnd:
        rows["random (mean of 3)"] = {k: float(np.mean([r[k] for r in rnd if k in r])) for k in rnd[0]}
    ranks: dict[str, list[float]] = {c: [] for c in rows}
    for col in cols:
        have = [c for c in rows if col in rows[c]]
        order = sorted(have, key=lambda c: -rows[c][col])
        for c in have:  # average rank for ties
            tied = [i + 1 for i, o in enumerate(order) if rows[o][col] == rows[c][col]]
            ranks[c].append(float(np.mean(tied)))
    head = "| criterion | " + " | ".join(f"{m} -{L}" for m, L in cols) + " | mean rank |"
    lines = [head, "|---|" + "---:|" * (len(cols) + 1)]
    lines.append("| original | " + " | ".join(f"{originals.get(m, float('nan')):.1f}" for m, _ in cols) + " | |")
    for c in sorted(rows, key=lambda c: np.mean(ranks[c]) if len(ranks[c]) == len(cols) else 1e9):
        cells = [f"{rows[c][col]:.1f}" if col in rows[c] else "" for col in cols]
        mr = f"{np.mean(ranks[c]):.2f}" if len(ranks[c]) == len(cols) else f"({np.mean(ranks[c]):.2f}, partial)"
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {mr} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shard", default=None, help="k/n: this worker's share of the units")
    ap.add_argument("--max-samples", type=int, default=128, help="calibration samples (the last 20%% held back)")
    ap.add_argument("--test-images", type=int, default=2000)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--criteria", default=",".join(CRITERIA), help="which criteria, in this order")
    ap.add_argument("--table", action="store_true", help="print the table of cached results and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args))
        return 0
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    units = [(m, c) for m in args.models.split(",") for c in args.criteria.split(",")]
    if args.shard:
        k, n = (int(v) for v in args.shard.split("/"))
        units = units[k::n]
    for m, c in units:
        p = cache_file(args, m, c)
        if p.exists():
            continue
        t0 = time.time()
        r = run_unit(args, m, c)
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(r, indent=1))
        os.replace(tmp, p)
        print(f"{m} {c}: {r['accuracy']} ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
