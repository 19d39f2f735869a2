"""Accuracy recovery benchmark (issue: the PyTorch bridge), for docs/BENCHMARKS.md.

    python -m tools.bench.finetune [--remove 15] [--train-samples 10000] [--epochs 1,3] [--threads 2]

Prunes the reference ResNet-56 (models/resnet56_fmnist.onnx) with the Consensus on the shipped 512
calibration images, then fine-tunes the pruned model through the bridge, supervised (labels) and by
label-free distillation from the original, for each epoch budget in --epochs (separate runs, each with its
own cosine schedule), on the first --train-samples Fashion-MNIST training images. Accuracy is measured on
the 10,000 test images (never used for calibration or training). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import onnx

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _folder(name: str, images: np.ndarray, labels: np.ndarray | None) -> str:
    from tools.data.fmnist import to_cifar_input

    folder = os.path.join(tempfile.gettempdir(), f"onnx-consensus-{name}")
    if not os.path.exists(os.path.join(folder, "x.npy")):
        os.makedirs(folder, exist_ok=True)
        np.save(os.path.join(folder, "x.npy"), to_cifar_input(images))
        if labels is not None:
            np.save(os.path.join(folder, "labels.npy"), labels)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(HERE, "models", "resnet56_fmnist.onnx"))
    ap.add_argument("--calib", default=os.path.join(HERE, "examples", "fmnist_calib"))
    ap.add_argument("--remove", type=int, default=15)
    ap.add_argument("--schedule", default="iterative", choices=("iterative", "one-shot"))
    ap.add_argument("--train-samples", type=int, default=10000)
    ap.add_argument("--epochs", default="1,3")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()

    from onnx_consensus import CriterionOptions, FinetuneConfig, RunOptions, TargetOptions, load_calibration
    from onnx_consensus.pruner import prune
    from onnx_consensus.finetune.evaluator import evaluator
    from onnx_consensus.finetune.job import finetune_pruned
    from tools.data.fmnist import load_fmnist

    model = onnx.load(args.model)
    tr_x, tr_y = load_fmnist("train")
    te_x, te_y = load_fmnist("test")
    test = load_calibration(_folder("test", te_x, te_y), model)
    train_lab = load_calibration(_folder(f"train{args.train_samples}", tr_x[:args.train_samples],
                                         tr_y[:args.train_samples]), model)
    train_unlab = load_calibration(_folder(f"train{args.train_samples}-nolabels", tr_x[:args.train_samples], None),
                                   model)
    acc = evaluator(model, test, threads=args.threads)
    t0 = time.perf_counter()
    res = prune(model, load_calibration(args.calib, model), criterion=CriterionOptions(schedule=args.schedule),
                target=TargetOptions(remove=args.remove), run=RunOptions(threads=args.threads))
    prune_s = time.perf_counter() - t0
    results = {"original_accuracy": acc(model), "pruned_accuracy": acc(res.model), "removed": res.removed_ids,
               "macs_before": res.macs_before, "macs_after": res.macs_after, "prune_seconds": prune_s,
               "train_samples": args.train_samples, "threads": args.threads, "runs": []}
    print(f"original {results['original_accuracy']:.4f}  pruned ({args.remove} blocks, "
          f"{1 - res.macs_after / res.macs_before:.2%} MACs) {results['pruned_accuracy']:.4f}", flush=True)
    for epochs in (int(e) for e in args.epochs.split(",")):
        for mode, train in (("supervised", train_lab), ("distillation", train_unlab)):
            config = FinetuneConfig(epochs=epochs, batch_size=args.batch_size, seed=args.seed, threads=args.threads)
            rec = finetune_pruned(model, res.model, train, config=config, eval_data=test, threads=args.threads,
                                  progress=False)
            ft, after = rec.result, rec.after
            per_epoch = ft.seconds / max(epochs, 1)
            row = {"mode": mode, "epochs": epochs, "accuracy": after, "seconds": ft.seconds,
                   "seconds_per_epoch": per_epoch, "images_seen": ft.images_seen,
                   "images_per_s": ft.images_seen / ft.seconds if ft.seconds else None,
                   "history": ft.history}
            results["runs"].append(row)
            print(f"{mode:<13} {epochs} epoch(s) of {args.train_samples} images: test accuracy {after:.4f} "
                  f"({(after - results['pruned_accuracy']) * 100:+.2f} pp over pruned), "
                  f"{per_epoch:.0f} s/epoch incl. eval", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)


if __name__ == "__main__":
    main()
