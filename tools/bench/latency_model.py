"""How well the per-block latency model predicts the measured latency of pruned models.

    python -m tools.bench.latency_model [--threads 1] [--batches 1,32] [--json docs/bench_latency_model.json]

For the shipped ResNet-56 and ViT: the latency model (``onnx_consensus.latency_model``) is measured once per
batch size; then for several removal counts and seeded random sets of removed blocks, the pruned model's
latency is measured (the same statistic, timed in alternated rounds with the original) and compared with the
prediction (the original's latency minus the removed blocks' savings). Prints a markdown table: mean and worst
absolute error in % of the measured latency, and the same for the MAC-proportional prediction (the original's
latency times the MACs kept) as the baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import onnx

from onnx_consensus.bench import random_feed
from onnx_consensus import count_cost, find_blocks, remove_blocks
from onnx_consensus.latency_model import QUANTILE, round_times, measure_block_latency

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = {"resnet56": ("models/resnet56_fmnist.onnx", (2, 5, 10, 15, 20)),
          "vit": ("models/vit_fmnist.onnx", (2, 4, 6, 8, 10))}


def measured(model, pruned, feed, threads, runs) -> float:
    times = round_times([model, pruned], feed, runs, threads)
    return float(np.percentile(times[1], QUANTILE))


def bench_model(name: str, batch: int, threads: int, runs: int, sets: int, seed: int = 0) -> list[dict]:
    path, counts = MODELS[name]
    model = onnx.load(os.path.join(ROOT, path))
    cost = count_cost(model)
    blocks = find_blocks(model, macs_per_node=cost.macs_per_node).blocks
    feed = random_feed(model, batch)
    t0 = time.perf_counter()
    lm = measure_block_latency(model, blocks, feed, threads=threads, runs=runs)
    seconds = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    rows = []
    for k in counts:
        for _ in range(sets):
            chosen = [blocks[i] for i in sorted(rng.choice(len(blocks), size=k, replace=False))]
            pruned = remove_blocks(model, chosen)
            meas = measured(model, pruned, feed, threads, runs)
            pred = lm.predict(b.id for b in chosen)
            kept = 1 - sum(b.macs for b in chosen) / cost.total_macs
            rows.append({"model": name, "batch": batch, "removed": k, "measured_ms": meas, "predicted_ms": pred,
                         "mac_predicted_ms": lm.base_ms * kept, "base_ms": lm.base_ms,
                         "model_seconds": round(seconds, 1)})
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | batch | original ms | removed | pruned ms, measured | latency model: mean / worst error | "
           "MAC-proportional: mean / worst error |", "|---|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({(r["model"], r["batch"], r["removed"]) for r in rows}, key=lambda t: (t[0], t[1], t[2]))
    for m, b, k in keys:
        rs = [r for r in rows if (r["model"], r["batch"], r["removed"]) == (m, b, k)]
        err = [abs(r["predicted_ms"] / r["measured_ms"] - 1) * 100 for r in rs]
        mac = [abs(r["mac_predicted_ms"] / r["measured_ms"] - 1) * 100 for r in rs]
        out.append(f"| {m} | {b} | {rs[0]['base_ms']:.3f} | {k} | {np.mean([r['measured_ms'] for r in rs]):.3f} | "
                   f"{np.mean(err):.1f}% / {max(err):.1f}% | {np.mean(mac):.1f}% / {max(mac):.1f}% |")
    allerr = [abs(r["predicted_ms"] / r["measured_ms"] - 1) * 100 for r in rows]
    allmac = [abs(r["mac_predicted_ms"] / r["measured_ms"] - 1) * 100 for r in rows]
    out.append(f"| all | | | | | {np.mean(allerr):.1f}% / {max(allerr):.1f}% | "
               f"{np.mean(allmac):.1f}% / {max(allmac):.1f}% |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet56,vit")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--sets", type=int, default=3, help="random block sets per removal count")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        for b in (int(x) for x in args.batches.split(",")):
            rows += bench_model(name, b, args.threads, args.runs, args.sets)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
