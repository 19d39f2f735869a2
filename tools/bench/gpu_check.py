"""GPU check (issue 15): prune and fine-tune the shipped ResNet-56 and ViT on the CPU and on CUDA, timings side by side.

    python -m tools.bench.gpu_check [--models resnet56,vit] [--epochs 1] [--max-samples 512] [--amp bf16] [--json out.json]
    python -m tools.bench.gpu_check --cpu-only --max-samples 64        # the script itself, on a machine without a GPU

For every model, two runs of the same command through the CLI (a subprocess each, so every run pays its own
start-up and CUDA initialisation, as a user's would):

    onnx-cprune prune MODEL OUT --calib CALIB --remove K --finetune-epochs E --report R.json -q \\
        --device cpu  --providers cpu                  # CPU
        --device cuda --providers cuda [--amp A]       # CUDA: bridge on the GPU, every onnxruntime session too

and prints per run: wall seconds, the pruning part (the run minus fine-tuning: scoring, removals, latency and
the evaluation before fine-tuning), fine-tuning seconds
and images/s, onnxruntime latency before/after at batch 1 and the calibration batch size (on that provider),
and the accuracy after fine-tuning on the calibration images' labels (--eval on the same folder: a check that
the GPU run learns as the CPU run does, not a test accuracy). Needs torch with CUDA and onnxruntime-gpu
(pip install 'onnx-consensus[gpu]'); without them it says so in one line and exits 2 (unless --cpu-only).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = {  # name: (model, calibration folder with labels.npy, blocks removed)
    "resnet56": ("models/resnet56_fmnist.onnx", "examples/fmnist_calib", 10),
    "vit": ("models/vit_fmnist.onnx", "examples/fmnist_vit_calib", 4),
}


def cuda_problem() -> str | None:
    """Why this machine cannot run the CUDA half, or None."""
    import onnxruntime as ort
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device (a CPU build, or no GPU)"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return ("onnxruntime has no CUDAExecutionProvider (available: "
                f"{', '.join(ort.get_available_providers())}): pip install 'onnx-consensus[gpu]'")
    return None


def run_one(name: str, device: str, args, workdir: str) -> dict:
    model, calib, remove = MODELS[name]
    out = os.path.join(workdir, f"{name}-{device}.onnx")
    report = os.path.join(workdir, f"{name}-{device}.json")
    cmd = [sys.executable, "-m", "onnx_consensus", "prune", os.path.join(HERE, model), out,
           "--calib", os.path.join(HERE, calib), "--remove", str(remove), "--finetune-epochs", str(args.epochs),
           "--eval", os.path.join(HERE, calib), "--report", report, "-q", "--seed", "0",
           "--device", device, "--providers", "cuda" if device == "cuda" else "cpu"]
    if args.max_samples:
        cmd += ["--max-samples", str(args.max_samples)]
    if device == "cuda" and args.amp:
        cmd += ["--amp", args.amp]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE] + [p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p]))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=HERE)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"gpu_check: {name} on {device} failed (exit {p.returncode}): "
                         f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
    rep = json.load(open(report))
    ft = rep.get("finetune") or {}
    lat = rep.get("latency") or {}
    ft_s = ft.get("seconds") or 0.0
    row = {"model": name, "device": device, "amp": args.amp if device == "cuda" else None, "wall_s": round(wall, 1),
           "run_s": rep.get("seconds"), "finetune_s": ft_s,
           "images_per_s": round(ft["images_seen"] / ft_s, 1) if ft_s else None,
           "accuracy_before": ft.get("metric_before"), "accuracy_after": ft.get("metric_after"),
           "latency_ms": {bs: (v["before_ms"], v["after_ms"]) for bs, v in lat.items()}}
    row["prune_s"] = round((rep.get("seconds") or 0.0) - ft_s, 1)  # scoring, removals, latency, evaluation
    return row


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet56,vit", help="comma-separated: " + ",".join(MODELS))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-samples", type=int, default=None, help="calibration samples (default: all 512)")
    ap.add_argument("--amp", choices=("bf16", "fp16"), default=None, help="mixed precision for the CUDA runs")
    ap.add_argument("--cpu-only", action="store_true", help="skip the CUDA runs (check the script without a GPU)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"gpu_check: unknown model(s) {unknown}: choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    devices = ["cpu"]
    if not args.cpu_only:
        problem = cuda_problem()
        if problem:
            print(f"gpu_check: no CUDA run possible: {problem} (--cpu-only to time the CPU half alone)",
                  file=sys.stderr)
            return 2
        devices.append("cuda")
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as d:
        for name in names:
            for device in devices:
                rows.append(run_one(name, device, args, d))
                print(f"... {name} on {device}: {rows[-1]['wall_s']} s", file=sys.stderr)
    print(f"prune + fine-tune ({args.epochs} epoch(s)), onnx-cprune prune ... --device D --providers D; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'model':<9} {'device':<10} {'wall s':>7} {'prune s':>9} {'ft s':>6} {'ft img/s':>8} "
          f"{'acc before':>10} {'acc after':>9}  latency ms before/after (batch: ms)")
    for r in rows:
        dev = r["device"] + (f"+{r['amp']}" if r["amp"] else "")
        lat = ", ".join(f"{bs}: {b:.2f}/{a:.2f}" for bs, (b, a) in r["latency_ms"].items())
        print(f"{r['model']:<9} {dev:<10} {r['wall_s']:>7.1f} {r['prune_s']:>9.1f} {_fmt(r['finetune_s']):>6} "
              f"{_fmt(r['images_per_s']):>8} {_fmt(r['accuracy_before'], '.4f'):>10} "
              f"{_fmt(r['accuracy_after'], '.4f'):>9}  {lat}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
