"""`--rescore-top K` against full re-scoring (issue 13): how often the iterative schedule's choices change,
and the time saved, on the shipped ResNet-56.

    python -m tools.bench_rescore [--criteria output_kl,paper] [--ks 3,5,8] [--remove 10] [--max-samples 128]

For each criterion, one full iterative run (every eligible candidate re-scored after each removal) and one
run per K; reported: rounds whose pick differs from the full run's pick at the same step, whether the final
set of removed blocks differs, and wall time of the pruning run. Results cached as JSON under
.cache/rescore/<config hash>/ (resumable).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL, CALIB = "models/resnet56_fmnist.onnx", "examples/fmnist_calib"


def run(metrics: str, k: int | None, remove: int, max_samples: int) -> dict:
    import onnx

    from onnx_consensus.data import load_calibration
    from onnx_consensus.options import CriterionOptions, RunOptions, TargetOptions
    from onnx_consensus.pruner import prune

    model = onnx.load(ROOT / MODEL)
    data = load_calibration(ROOT / CALIB, model, max_samples=max_samples)
    t0 = time.perf_counter()
    res = prune(model, data, criterion=CriterionOptions(metrics=(metrics,), rescore_top=k),
                target=TargetOptions(remove=remove), run=RunOptions(threads=1))
    return {"metrics": metrics, "k": k, "order": res.removed_ids, "seconds": round(time.perf_counter() - t0, 1),
            "scored": sum(len(r.blocks) for r in res.rounds)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--criteria", default="output_kl,paper")
    ap.add_argument("--ks", default="3,5,8")
    ap.add_argument("--remove", type=int, default=10)
    ap.add_argument("--max-samples", type=int, default=128)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--full", default=None, help="take the full run of the (single) criterion from this "
                    "tools/bench_criteria.py result JSON (same model, calibration, samples, removals)")
    args = ap.parse_args(argv)
    key = hashlib.sha1(json.dumps([MODEL, CALIB, args.remove, args.max_samples]).encode()).hexdigest()[:10]
    cache = ROOT / ".cache" / "rescore" / key
    cache.mkdir(parents=True, exist_ok=True)
    ks = [None] + [int(k) for k in args.ks.split(",")]
    lines = ["| criterion | K | candidates scored | picks changed (of rounds) | final set changed | "
             "prune seconds | time saved |", "|---|---:|---:|---:|---:|---:|---:|"]
    for crit in args.criteria.split(","):
        full = None
        for k in ks:
            p = cache / f"{crit.replace('+', '_')}_{k or 'all'}.json"
            if not p.exists() and k is None and args.full:
                f = json.loads(Path(args.full).read_text())
                p.write_text(json.dumps({"metrics": crit, "k": None, "order": f["order"][:args.remove],
                                         "seconds": f["prune_seconds"], "scored": None}, indent=1))
            if not p.exists():
                if args.table:
                    continue
                r = run(crit, k, args.remove, args.max_samples)
                tmp = p.with_suffix(f".tmp{os.getpid()}")
                tmp.write_text(json.dumps(r, indent=1))
                os.replace(tmp, p)
            r = json.loads(p.read_text())
            if k is None:
                full = r
            if full is None:
                continue
            changed = sum(a != b for a, b in zip(r["order"], full["order"]))
            final = set(r["order"]) != set(full["order"])
            saved = 1 - r["seconds"] / full["seconds"]
            lines.append(f"| {crit} | {k or 'all'} | {r['scored'] or ''} | {changed} / {len(full['order'])} | "
                         f"{'yes' if final else 'no'} | {r['seconds']:.0f} | {saved:.0%} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
