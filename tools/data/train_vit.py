"""Train the small pre-LN ViT (models/tiny_transformers.py TinyViT) on Fashion-MNIST within a wall-clock budget.

Run from the repository root::

    python -m tools.data.train_vit --minutes 12 --threads 1

Input: (N, 1, 28, 28) float32, pixels scaled to [0, 1] then normalised with tools.data.fmnist MEAN/STD.
Recipe: AdamW (lr 2e-3, weight decay 0.05), batch 128, linear warm-up over the first 5% of the steps then
cosine decay, random shifts of up to 2 pixels (background padding) + horizontal flips, label smoothing 0.1.
The number of steps is estimated from the first timed steps so the schedule fits the budget.

Writes models/vit_fmnist.onnx (classic exporter, opset 17, dynamic batch), models/vit_fmnist.json (recipe
and test accuracy, torch and onnxruntime), and examples/fmnist_vit_calib/ (512 training images + labels).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: see tools/data/train_reference.py

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.tiny_transformers import TinyViT, export_onnx  # noqa: E402
from tools.data.fmnist import DEFAULT_ROOT, MEAN, STD, load_fmnist  # noqa: E402

BACKGROUND = (0.0 - MEAN) / STD


def to_vit_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), normalised."""
    x = (images.astype(np.float32) / np.float32(255.0) - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(x[:, None], dtype=np.float32)


def write_sets(out_dir: str, x: np.ndarray, y: np.ndarray) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    np.save(os.path.join(out_dir, "calib.npy"), x.astype(np.float32))
    np.save(os.path.join(out_dir, "labels.npy"), y.astype(np.int64))


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=BACKGROUND)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    rows = oy[:, None] + torch.arange(h)[None, :]
    ar = torch.arange(w)
    cols = torch.where(flip[:, None], ox[:, None] + (w - 1) - ar[None, :], ox[:, None] + ar[None, :])
    bi = torch.arange(b)[:, None, None]
    return padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def accuracy(model, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    model.eval()
    out = np.concatenate([model(torch.from_numpy(x[i:i + batch])).numpy() for i in range(0, len(x), batch)])
    return float((out.argmax(1) == y).mean() * 100)


def ort_accuracy(path: str, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    out = np.concatenate([sess.run(None, {"image": x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return float((out.argmax(1) == y).mean() * 100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.data.train_vit", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=12.0)
    p.add_argument("--epochs", type=float, default=30.0, help="cap on epochs")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=7)
    p.add_argument("--layer-scale", type=float, default=None, help="LayerScale init (default: none)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="models/vit_fmnist.onnx")
    p.add_argument("--calib-out", default="examples/fmnist_vit_calib")
    args = p.parse_args(argv)
    command = "python -m tools.data.train_vit " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    tr_img, tr_lbl = load_fmnist("train", DEFAULT_ROOT)
    te_img, te_lbl = load_fmnist("test", DEFAULT_ROOT)
    x_train, x_test = to_vit_input(tr_img), to_vit_input(te_img)
    idx = np.random.default_rng(args.seed).choice(len(tr_img), size=512, replace=False)
    write_sets(args.calib_out, x_train[idx], tr_lbl[idx])

    model = TinyViT(patch=args.patch, dim=args.dim, depth=args.depth, heads=args.heads,
                    layer_scale=args.layer_scale)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n and "token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(tr_lbl)
    n = len(xt)
    steps_per_epoch = n // args.batch_size
    budget = args.minutes * 60
    start = time.perf_counter()
    total_steps = int(args.epochs * steps_per_epoch)
    step, epoch = 0, 0
    losses = []
    done = False
    while not done:
        perm = torch.randperm(n, generator=gen)
        model.train()
        for i in range(steps_per_epoch):
            if step == 30:  # estimate the schedule length from the measured throughput
                per_step = (time.perf_counter() - start) / 30
                total_steps = min(total_steps, int(budget / per_step))
            elif step > 30 and step % 200 == 0:
                per_step = (time.perf_counter() - start) / step
                total_steps = max(step + 1, min(total_steps, int(budget / per_step)))
            if step >= total_steps:
                done = True
                break
            warm = max(1, int(0.05 * total_steps))
            lr = args.lr * (step + 1) / warm if step < warm else \
                args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))
            for g in opt.param_groups:
                g["lr"] = lr
            b = perm[i * args.batch_size:(i + 1) * args.batch_size]
            xb = augment(xt[b], gen)
            loss = F.cross_entropy(model(xb), yt[b], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss))
            step += 1
            if step % 200 == 0:
                print(f"step {step}/{total_steps} epoch {epoch} loss {np.mean(losses[-200:]):.4f} lr {lr:.2e} "
                      f"{time.perf_counter() - start:.0f}s", flush=True)
        epoch += 1
    train_seconds = time.perf_counter() - start
    acc = accuracy(model, x_test, te_lbl)
    print(f"torch test accuracy {acc:.2f}%", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, str(out))
    ort_acc = ort_accuracy(str(out), x_test, te_lbl)
    print(f"onnxruntime test accuracy {ort_acc:.2f}%", flush=True)
    info = {"model": "TinyViT (pre-LN)", "command": command, "patch": args.patch, "dim": args.dim,
            "depth": args.depth, "heads": args.heads, "layer_scale": args.layer_scale, "params": n_params,
            "tokens": (28 // args.patch) ** 2 + 1, "input": "image (N,1,28,28) float32, (x/255 - MEAN)/STD",
            "mean": MEAN, "std": STD, "optimizer": "AdamW", "lr": args.lr, "weight_decay": args.weight_decay,
            "batch_size": args.batch_size, "steps": step, "epochs": round(step / steps_per_epoch, 2),
            "train_seconds": round(train_seconds, 1), "threads": args.threads, "seed": args.seed,
            "test_accuracy_torch": round(acc, 2), "test_accuracy_onnxruntime": round(ort_acc, 2),
            "export": "classic exporter, opset 17, dynamic batch", "torch": torch.__version__}
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
