"""Benchmark of one scoring round (issue: the Consensus criterion), for docs/BENCHMARKS.md.

    python -m tools.bench.scoring [--model models/resnet56_fmnist.onnx] [--samples 512] [--threads 2]

Measures, each configuration in a fresh subprocess (so peak RSS is its own):
- a global-scope scoring round with all eight metrics: wall time, split into onnxruntime and metric time;
- the floor: onnxruntime alone, same session options, running every candidate's suffix plus one full
  forward over the same batches (what any global-scope implementation must at least spend);
- peak RSS at 128 and 512 samples (memory must not grow with the samples beyond the n x d features);
- the local scope; and one-shot vs iterative schedules for 15 removals.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _data(model_path: str, samples: int):
    import tempfile

    import numpy as np
    import onnx

    from onnx_consensus import load_calibration
    from tools.data.fmnist import load_fmnist, to_cifar_input

    folder = os.path.join(tempfile.gettempdir(), f"bench-calib-{samples}")
    if not os.path.exists(os.path.join(folder, "x.npy")):
        os.makedirs(folder, exist_ok=True)
        images, labels = load_fmnist("train")
        idx = np.random.default_rng(0).choice(len(images), samples, replace=False)
        np.save(os.path.join(folder, "x.npy"), to_cifar_input(images[idx]))
        np.save(os.path.join(folder, "labels.npy"), labels[idx])
    model = onnx.load(model_path)
    return model, load_calibration(folder, model)


def run_config(cfg: dict) -> dict:
    """One measurement, run inside the child process."""
    from onnx_consensus import CriterionOptions, RunOptions, TargetOptions, find_blocks
    from onnx_consensus.graph.instrument import expose, suffix_model
    from onnx_consensus.kinds.outputs import find_feature_tensor
    from onnx_consensus.pruner import prune
    from onnx_consensus.runtime import make_session
    from onnx_consensus import score_blocks

    model, data = _data(cfg["model"], cfg["samples"])
    threads, bs = cfg["threads"], cfg["batch_size"]
    out: dict = dict(cfg)
    t0 = time.perf_counter()
    if cfg["kind"] == "round":
        rnd = score_blocks(model, data, scope=cfg["scope"], batch_size=bs, threads=threads)
        out.update(wall_s=time.perf_counter() - t0, ort_s=rnd.ort_seconds, metric_s=rnd.metric_seconds,
                   candidates=len(rnd.blocks))
    elif cfg["kind"] == "floor":
        blocks = find_blocks(model).blocks
        feature = find_feature_tensor(model)
        suffixes = [suffix_model(model, b, [feature]) for b in blocks]
        sessions = [make_session(s.model, level="all", threads=threads) for s in suffixes]
        full = make_session(expose(model, [feature] + [b.entry for b in blocks]), level="basic", threads=threads)
        names = [o.name for o in full.get_outputs()]
        t0 = time.perf_counter()
        for feeds in data.batches(bs):
            values = dict(zip(names, full.run(None, feeds)))
            for sess in sessions:
                sess.run(None, {i.name: values[i.name] for i in sess.get_inputs()})
        out.update(wall_s=time.perf_counter() - t0, candidates=len(blocks))
    elif cfg["kind"] == "schedule":
        res = prune(model, data, criterion=CriterionOptions(schedule=cfg["schedule"]),
                    target=TargetOptions(remove=cfg["remove"]), run=RunOptions(batch_size=bs, threads=threads))
        f = res.fidelity
        out.update(wall_s=time.perf_counter() - t0, rounds=len(res.rounds), removed=res.removed_ids,
                   holdout_agreement=f.agreement, holdout_accuracy=f.accuracy,
                   holdout_reference_accuracy=f.reference_accuracy)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(HERE, "models", "resnet56_fmnist.onnx"))
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--remove", type=int, default=15)
    ap.add_argument("--skip-schedules", action="store_true")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_config(json.loads(args.child))))
        return
    base = {"model": args.model, "threads": args.threads, "batch_size": args.batch_size, "samples": args.samples}
    configs = [
        {**base, "kind": "floor"},
        {**base, "kind": "round", "scope": "global"},
        {**base, "kind": "round", "scope": "global", "samples": 128},
        {**base, "kind": "round", "scope": "local"},
    ]
    if not args.skip_schedules:
        configs += [{**base, "kind": "schedule", "schedule": s, "remove": args.remove} for s in ("one-shot", "iterative")]
    results = []
    for cfg in configs:
        p = subprocess.run([sys.executable, "-m", "tools.bench.scoring", "--child", json.dumps(cfg)],
                           capture_output=True, text=True, cwd=HERE)
        if p.returncode:
            sys.exit(f"configuration {cfg} failed:\n{p.stderr}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        results.append(r)
        desc = r["kind"] + (f" {r.get('scope', '')}" if r["kind"] == "round" else "") + (
            f" {r.get('schedule', '')}" if r["kind"] == "schedule" else "")
        extra = ""
        if r["kind"] == "round":
            extra = f"ort {r['ort_s']:.2f} s, metrics {r['metric_s']:.2f} s"
        if r["kind"] == "schedule":
            extra = (f"{r['rounds']} round(s), hold-out agreement {r['holdout_agreement']:.4f}, "
                     f"accuracy {r['holdout_accuracy']:.4f} (original {r['holdout_reference_accuracy']:.4f})")
        print(f"{desc:<22} n={r['samples']:<4} wall {r['wall_s']:8.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB  {extra}",
              flush=True)
    floor = next(r for r in results if r["kind"] == "floor")
    glob = next(r for r in results if r["kind"] == "round" and r["scope"] == "global" and r["samples"] == args.samples)
    print(f"\nglobal round / floor = {glob['wall_s'] / floor['wall_s']:.2f}x; "
          f"metrics share of the round = {glob['metric_s'] / glob['wall_s']:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
