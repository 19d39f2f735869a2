"""Latency-aware against MAC-proportional against damage-only choice, at the same latency target.

    python -m tools.bench.latency_choice [--target 0.6] [--threads 1] [--json docs/bench_latency_choice.json]

For the shipped ResNet-56 and ViT: `prune --target-latency F --latency-choice C` (no fine-tuning, the default
criterion, the first --max-samples calibration images) for each choice C; then each written model's test
accuracy on the first 2,000 Fashion-MNIST test images (needs `apt-get install dataset-fashion-mnist`) and its
measured latency (the run's own measurement beside the original: batch 1, --threads). Prints a markdown table
with the latency saved per accuracy point lost.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import onnx
import onnxruntime as ort

from onnx_consensus import DataOptions, OutputOptions, RunOptions, TargetOptions, prune
from tools.data.fmnist import MEAN, STD, load_fmnist, to_cifar_input

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = {"resnet56": ("models/resnet56_fmnist.onnx", "examples/fmnist_calib"),
          "vit": ("models/vit_fmnist.onnx", "examples/fmnist_vit_calib")}


def test_set(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_fmnist("test")
    images, labels = images[:n], labels[:n]
    if name == "resnet56":
        return to_cifar_input(images), labels
    x = (images.astype(np.float32) / np.float32(255.0) - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(x[:, None]), labels


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    pred = np.concatenate([s.run(None, {name: x[i:i + 250]})[0].argmax(1) for i in range(0, len(x), 250)])
    return float(np.mean(pred == y))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet56,vit")
    ap.add_argument("--choices", default="damage,macs,latency")
    ap.add_argument("--target", type=float, default=0.6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-samples", type=int, default=128)
    ap.add_argument("--test", type=int, default=2000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        path, calib = (os.path.join(ROOT, p) for p in MODELS[name])
        model = onnx.load(path)
        x, y = test_set(name, args.test)
        base_acc = accuracy(model, x, y)
        for choice in args.choices.split(","):
            t0 = time.perf_counter()
            out = prune(model, calib, target=TargetOptions(target_latency=args.target, latency_choice=choice),
                        run=RunOptions(threads=args.threads, progress=False), output=OutputOptions(latency=False),
                        data_options=DataOptions(max_samples=args.max_samples))
            lt = out.report["latency_target"]
            acc = accuracy(out.model, x, y)
            rows.append({"model": name, "choice": choice, "removed": len(out.removed_ids),
                         "removed_ids": out.removed_ids, "macs_ratio": out.report["macs"]["ratio"],
                         "original_ms": lt["original_ms"], "measured_ms": lt["measured_ms"],
                         "goal_ms": lt["goal_ms"], "attempts": len(lt["attempts"]), "accuracy": acc,
                         "original_accuracy": base_acc, "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


def table(rows: list[dict]) -> str:
    out = ["| model | choice | blocks removed | MACs kept | latency: measured / original (ms) | latency saved | "
           "test top-1 (original) | ms saved per pp lost |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        saved = r["original_ms"] - r["measured_ms"]
        lost = (r["original_accuracy"] - r["accuracy"]) * 100
        per = f"{saved / lost:.4f}" if lost > 0 else "no loss"
        out.append(f"| {r['model']} | {r['choice']} | {r['removed']} | {r['macs_ratio']:.1%} | "
                   f"{r['measured_ms']:.3f} / {r['original_ms']:.3f} | {saved / r['original_ms']:.1%} | "
                   f"{r['accuracy']:.2%} ({r['original_accuracy']:.2%}) | {per} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
