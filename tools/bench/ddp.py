"""Data-parallel fine-tuning throughput (issue 15): images/s for 1 and 2 gloo processes, scaling, memory.

    python -m tools.bench.ddp [--model models/resnet56_fmnist.onnx] [--global-batch 64] [--steps 10]
                              [--warmup 2] [--configs 1x1,1x2,2x1] [--json out.json]

Each configuration PxT runs P ranks of T torch threads each under ``torchrun --standalone`` (gloo on
CPU) and fine-tunes the model by label-free distillation from itself (the teacher, an onnxruntime
session of T threads, runs on every rank) for --steps optimiser steps at a fixed global batch
(--global-batch images per step, split evenly over the ranks: the same optimisation whatever P).
Images are random (throughput does not depend on values), read from .npy shards like real data.

Throughput is measured on each rank from the end of step --warmup to the end of the last step
(wall clock; the first steps build the teacher session and DDP's buckets) and the slowest rank's figure
counts: global images / seconds. Peak memory is each rank's peak RSS (ru_maxrss: interpreter, torch,
onnxruntime, model, teacher and activations). Scaling efficiency of PxT against 1xT' is
throughput(P) / (P * throughput(1)) when T' = T (each process brings its own core), and
throughput(P) / throughput(1) at equal total threads (P*T = T': what more processes buy on the same
cores). The machine may be shared: the load average is printed with the results. Workers run with
OMP_WAIT_POLICY=PASSIVE unless the environment sets it (spin-waiting OpenMP threads take cores from the
other rank and from the teacher).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _worker(args) -> None:
    """One rank (started by torchrun): fine-tune, time the steady steps, write rank<r>.json."""
    import onnx
    import torch

    from onnx_consensus import FinetuneConfig, load_calibration
    from onnx_consensus.bridge.distributed import joined
    from onnx_consensus.finetune.epochs import training_batches
    from onnx_consensus.finetune.train import finetune

    torch.set_num_threads(args.threads)
    model = onnx.load(args.model)
    data = load_calibration(args.data, model)
    with joined("cpu", timeout_s=600) as ctx:
        world, rank = (1, 0) if ctx is None else (ctx.world_size, ctx.rank)
        per_rank = args.global_batch // world
        stamps: list[float] = []
        shards = training_batches(data, per_rank, seed=0, dist=ctx)

        def epoch():
            """The rank's steps; a time stamp at every batch request (= the end of the previous step)."""
            def gen():
                for batch in shards():
                    stamps.append(time.perf_counter())
                    yield batch
                stamps.append(time.perf_counter())
            return gen()

        config = FinetuneConfig(epochs=1, threads=args.threads, seed=0, max_steps=None)
        _, result = finetune(model, epoch, teacher=model, config=config, progress=False, dist=ctx)
        steps = len(stamps) - 1
        seconds = stamps[-1] - stamps[args.warmup]
        out = {"rank": rank, "world": world, "threads": args.threads, "per_rank_batch": per_rank, "steps": steps,
               "timed_steps": steps - args.warmup, "seconds": seconds,
               "images_per_s": (steps - args.warmup) * per_rank * world / seconds,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "total_seconds": result.seconds}
        with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)


def _run(args, procs: int, threads: int, data: str, workdir: str) -> dict:
    out = os.path.join(workdir, f"{procs}x{threads}")
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "tools.bench.ddp", "--worker", "--model", args.model, "--data", data, "--out", out,
           "--threads", str(threads), "--global-batch", str(args.global_batch), "--warmup", str(args.warmup)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the other benchmarks: no spin-waiting OpenMP threads
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(procs)]
    return {"config": f"{procs}x{threads}", "processes": procs, "threads": threads,
            "per_rank_batch": ranks[0]["per_rank_batch"], "timed_steps": ranks[0]["timed_steps"],
            "images_per_s": min(r["images_per_s"] for r in ranks),
            "peak_rss_mb_per_rank": [round(r["peak_rss_mb"], 1) for r in ranks],
            "launch_seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(HERE, "models", "resnet56_fmnist.onnx"))
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="optimiser steps per configuration (warm-up included)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--configs", default="1x1,1x2,2x1", help="PROCESSESxTHREADS, comma-separated")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")

    import onnx

    from onnx_consensus.data import model_input_specs

    spec = model_input_specs(onnx.load(args.model, load_external_data=False))[0]
    shape = tuple(d if isinstance(d, int) else 1 for d in spec.shape[1:])
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    with tempfile.TemporaryDirectory() as workdir:
        data = os.path.join(workdir, "data")
        os.makedirs(data)
        n = args.steps * args.global_batch
        rng = np.random.default_rng(0)
        for k in range(0, n, 256):  # several files, as a real training folder
            np.save(os.path.join(data, f"x{k:06d}.npy"), rng.standard_normal((min(256, n - k), *shape)).astype(spec.dtype))
        rows = []
        for procs, threads in configs:
            if args.global_batch % procs:
                ap.error(f"--global-batch {args.global_batch} does not split over {procs} processes")
            rows.append(_run(args, procs, threads, data, workdir))
            print(f"{rows[-1]['config']}: {rows[-1]['images_per_s']:.1f} images/s", file=sys.stderr)
    by = {(r["processes"], r["threads"]): r["images_per_s"] for r in rows}
    for r in rows:
        p, t = r["processes"], r["threads"]
        if p > 1 and (1, t) in by:
            r["efficiency_same_threads_per_process"] = round(r["images_per_s"] / (p * by[(1, t)]), 3)
        if p > 1 and (1, p * t) in by:
            r["speedup_same_total_threads"] = round(r["images_per_s"] / by[(1, p * t)], 3)
    load = os.getloadavg()
    report = {"model": os.path.relpath(args.model, HERE), "global_batch": args.global_batch, "steps": args.steps,
              "warmup": args.warmup, "cpus": os.cpu_count(), "loadavg": [round(v, 2) for v in load], "results": rows}
    print(f"model {report['model']}, global batch {args.global_batch}, {os.cpu_count()} CPUs, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'config':>7} {'batch/rank':>10} {'images/s':>9} {'eff.(same T)':>12} {'speedup(same cores)':>19} "
          f"{'peak RSS/rank MB':>16}")
    for r in rows:
        eff = r.get("efficiency_same_threads_per_process")
        sp = r.get("speedup_same_total_threads")
        print(f"{r['config']:>7} {r['per_rank_batch']:>10} {r['images_per_s']:>9.1f} "
              f"{'' if eff is None else f'{eff:.2f}':>12} {'' if sp is None else f'{sp:.2f}':>19} "
              f"{', '.join(f'{m:.0f}' for m in r['peak_rss_mb_per_rank']):>16}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
