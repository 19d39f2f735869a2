"""Train the CIFAR-style reference ResNet (models/cifar_resnet.py) on Fashion-MNIST within a wall-clock budget.

Run from the repository root::

    python -m tools.data.train_reference --depth 56 --minutes 45 --threads 2

Recipe: SGD (momentum 0.9, Nesterov, weight decay 5e-4), batch 128, one-cycle schedule (linear warm-up
from peak/25 to the peak lr over the first 15% of the run, then cosine decay to ~0), random crop (pad 4
with the normalised background value) + horizontal flip, done batched in torch (no torchvision).

The number of steps is not known in advance: the first steps are timed (at lr = peak/25) and the
schedule is laid over the number of steps estimated to fit the budget, capped by --epochs. The estimate
is refreshed every --log-every steps from the measured throughput so that a slower (shared) machine
compresses the rest of the schedule instead of overrunning the budget; progress along the schedule
never jumps, so the lr curve stays continuous. The budget covers the training loop; the final torch
evaluation, ONNX export and onnxruntime evaluation come on top.

At the end: torch test accuracy (10,000 test images), export with
export_onnx(model, out, opset=17, fold_bn=True), onnxruntime test accuracy (must match torch's within
0.05 percentage points) and a JSON sidecar next to the .onnx file.
"""
from __future__ import annotations

import os

# On a machine whose cores are shared with other processes, OpenMP's default busy-wait between parallel
# regions makes the threads fight for the cores: measured here on 2 shared cores, ResNet-20 training ran
# at ~11-15 img/s with the default policy vs ~80-210 img/s with PASSIVE (and ~700 img/s alone). It has to
# be set before libgomp is loaded (i.e. before torch is imported); an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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

from models.cifar_resnet import export_onnx, resnet  # noqa: E402
from tools.data.fmnist import DEFAULT_ROOT, MEAN, STD, load_fmnist, to_cifar_input  # noqa: E402

BACKGROUND = (0.0 - MEAN) / STD  # normalised value of a zero pixel
WARMUP_FRACTION = 0.15
START_DIV = 25.0  # one-cycle: the run starts at peak_lr / START_DIV
TIMING_STEPS = 20  # steps timed (after TIMING_SKIP warm-up steps) before the first estimate
TIMING_SKIP = 3
MAX_ACC_DIFF_PP = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.data.train_reference", description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=56, help="ResNet depth, 6n+2 (default 56)")
    p.add_argument("--minutes", type=float, default=45.0, help="wall-clock budget of the training loop")
    p.add_argument("--epochs", type=float, default=30.0, help="cap on the number of epochs (default 30)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=2, help="torch / onnxruntime intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="models/resnet56_fmnist.onnx")
    p.add_argument("--data-root", default=DEFAULT_ROOT)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-batch", type=int, default=500)
    return p.parse_args(argv)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Batched random crop (pad with the normalised background) + random horizontal flip. x: (B, C, H, W)."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), value=BACKGROUND)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    ar_h = torch.arange(h)
    ar_w = torch.arange(w)
    rows = oy[:, None] + ar_h[None, :]  # (B, H)
    cols = torch.where(flip[:, None], ox[:, None] + (w - 1) - ar_w[None, :], ox[:, None] + ar_w[None, :])  # (B, W)
    bi = torch.arange(b)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def lr_at(progress: float, peak: float) -> float:
    """One-cycle lr at schedule progress in [0, 1] (0 = end of the timing phase, 1 = end of training)."""
    if progress < WARMUP_FRACTION:  # linear warm-up: peak/START_DIV -> peak
        return peak / START_DIV + (peak - peak / START_DIV) * progress / WARMUP_FRACTION
    t = min((progress - WARMUP_FRACTION) / (1 - WARMUP_FRACTION), 1.0)
    return peak * 0.5 * (1 + math.cos(math.pi * t))


@torch.no_grad()
def torch_accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    model.eval()
    logits = []
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i : i + batch]).contiguous(memory_format=torch.channels_last)
        logits.append(model(xb).float().numpy())
    out = np.concatenate(logits)
    return float((out.argmax(1) == y).mean() * 100), out


def ort_accuracy(path: str, x: np.ndarray, y: np.ndarray, batch: int, threads: int) -> tuple[float, np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    logits = [sess.run(["logits"], {"input": x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    out = np.concatenate(logits)
    return float((out.argmax(1) == y).mean() * 100), out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m tools.data.train_reference " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    out_path = Path(args.out)
    json_path = out_path.with_suffix(".json")
    out_path.parent.mkdir(parents=True, exist_ok=True)

    t_load = time.time()
    train_img, train_lbl = load_fmnist("train", args.data_root)
    test_img, test_lbl = load_fmnist("test", args.data_root)
    # Keep one grey channel in memory (60000x1x32x32 float32 = 245 MB); replicate to 3 channels per batch.
    x_train = torch.from_numpy(to_cifar_input(train_img)[:, :1].copy())
    y_train = torch.from_numpy(train_lbl)
    x_test = to_cifar_input(test_img)
    n_train = len(x_train)
    steps_per_epoch = n_train // args.batch_size  # drop the last incomplete batch
    max_steps = max(1, int(args.epochs * steps_per_epoch))
    print(f"data: {n_train} train / {len(x_test)} test images ({time.time() - t_load:.1f}s); "
          f"{steps_per_epoch} steps/epoch, cap {max_steps} steps ({args.epochs:g} epochs)", flush=True)

    model = resnet(args.depth, 10).to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: ResNet-{args.depth}, {n_params:,} parameters; threads={torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}", flush=True)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr / START_DIV, momentum=args.momentum,
                          nesterov=True, weight_decay=args.weight_decay)

    budget = args.minutes * 60.0
    step = 0
    epoch = 0
    perm = torch.from_numpy(rng.permutation(n_train))
    pos = 0
    progress = 0.0  # position along the schedule, 0..1
    planned_steps: int | None = None
    ema_sec_per_step = 0.0
    t_start = time.time()
    t_timing = None
    win_t, win_images, win_loss, win_correct, win_steps = time.time(), 0, 0.0, 0, 0
    diverged = False

    while True:
        now = time.time()
        elapsed = now - t_start
        if step >= max_steps or (planned_steps is not None and progress >= 1.0 - 1e-9):
            break
        if planned_steps is None and elapsed > budget:
            break  # budget smaller than the timing phase

        # --- schedule
        if step == TIMING_SKIP:
            t_timing = now
        if planned_steps is None and step == TIMING_SKIP + TIMING_STEPS:
            sec_per_step = (now - t_timing) / TIMING_STEPS
            ema_sec_per_step = sec_per_step
            remaining = max(1, min(int((budget - elapsed) / sec_per_step), max_steps - step))
            planned_steps = step + remaining
            print(f"timing: {sec_per_step:.3f} s/step ({args.batch_size / sec_per_step:.1f} img/s) -> "
                  f"{planned_steps} planned steps ({planned_steps / steps_per_epoch:.2f} epochs) "
                  f"in {args.minutes:g} min", flush=True)
            progress_per_step = 1.0 / remaining
        if planned_steps is None:
            lr = args.lr / START_DIV
        else:
            lr = lr_at(progress, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr

        # --- batch
        if pos + args.batch_size > n_train:
            epoch += 1
            perm = torch.from_numpy(rng.permutation(n_train))
            pos = 0
        idx = perm[pos : pos + args.batch_size]
        pos += args.batch_size
        xb = augment(x_train[idx], gen).expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
        yb = y_train[idx]

        model.train()
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = loss.item()
        if not math.isfinite(loss_v):
            print(f"step {step}: loss is {loss_v}; diverged (try a lower --lr)", flush=True)
            diverged = True
            break
        step += 1
        if planned_steps is not None:
            progress = min(1.0, progress + progress_per_step)
        win_images += len(yb)
        win_loss += loss_v
        win_correct += int((logits.argmax(1) == yb).sum())
        win_steps += 1

        if step % args.log_every == 0:
            now = time.time()
            ips = win_images / (now - win_t)
            elapsed = now - t_start
            msg = (f"step {step:6d} ep {step / steps_per_epoch:5.2f} loss {win_loss / win_steps:.4f} "
                   f"train_acc {100 * win_correct / win_images:5.1f}% lr {lr:.4f} {ips:6.1f} img/s "
                   f"elapsed {elapsed / 60:5.1f} min")
            if planned_steps is not None:
                # Re-plan the rest of the schedule from the recent throughput (EMA over log windows, so one
                # slow window does not squash the schedule); progress itself never jumps.
                ema_sec_per_step = 0.7 * ema_sec_per_step + 0.3 * (args.batch_size / ips)
                remaining = max(1, min(int((budget - elapsed) / ema_sec_per_step), max_steps - step))
                planned_steps = step + remaining
                progress_per_step = (1.0 - progress) / remaining
                msg += f" progress {100 * progress:5.1f}% planned {planned_steps}"
            print(msg, flush=True)
            win_t, win_images, win_loss, win_correct, win_steps = now, 0, 0.0, 0, 0

    train_seconds = time.time() - t_start
    if diverged:
        return 2
    images_seen = step * args.batch_size
    print(f"training done: {step} steps, {images_seen} images ({images_seen / n_train:.2f} epochs) in "
          f"{train_seconds / 60:.1f} min ({images_seen / train_seconds:.1f} img/s overall)", flush=True)

    t0 = time.time()
    torch_acc, torch_logits = torch_accuracy(model, x_test, test_lbl, args.eval_batch)
    print(f"torch test accuracy: {torch_acc:.2f}% ({time.time() - t0:.0f}s)", flush=True)

    model = model.to(memory_format=torch.contiguous_format).eval()
    export_onnx(model, str(out_path), opset=17, fold_bn=True)
    import onnx

    m = onnx.load(str(out_path))
    onnx.checker.check_model(m)
    n_bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
    if n_bn:
        raise RuntimeError(f"{out_path}: {n_bn} BatchNormalization nodes left after fold_bn=True export")
    print(f"exported {out_path} ({out_path.stat().st_size / 1e6:.2f} MB, {len(m.graph.node)} nodes, no BN)", flush=True)

    t0 = time.time()
    ort_acc, ort_logits = ort_accuracy(str(out_path), x_test, test_lbl, args.eval_batch, args.threads)
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    n_disagree = int((ort_logits.argmax(1) != torch_logits.argmax(1)).sum())
    print(f"onnxruntime test accuracy: {ort_acc:.2f}% ({time.time() - t0:.0f}s); max |logit diff| {max_diff:.2e}, "
          f"{n_disagree} argmax disagreements", flush=True)
    if abs(ort_acc - torch_acc) > MAX_ACC_DIFF_PP:
        print(f"ERROR: onnxruntime accuracy {ort_acc:.2f}% differs from torch {torch_acc:.2f}% by more than "
              f"{MAX_ACC_DIFF_PP} pp; not writing {json_path}", flush=True)
        return 3

    info = {
        "depth": args.depth,
        "dataset": "fashion-mnist",
        "test_accuracy": round(ort_acc, 2),
        "torch_test_accuracy": round(torch_acc, 2),
        "test_images": int(len(test_lbl)),
        "train_images_seen": images_seen,
        "epochs": round(images_seen / n_train, 3),
        "epochs_cap": args.epochs,
        "minutes": args.minutes,
        "train_seconds": round(train_seconds, 1),
        "images_per_second": round(images_seen / train_seconds, 1),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "schedule": "one-cycle: linear warm-up lr/25 -> lr over 15% of steps, cosine to 0",
        "optimizer": f"SGD momentum {args.momentum} nesterov, weight decay {args.weight_decay}",
        "augmentation": "random crop 32 (pad 4, background value) + horizontal flip",
        "preprocessing": f"pad 28->32 with 0, /255, (x - {MEAN}) / {STD}, grey replicated to 3 channels",
        "seed": args.seed,
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch_version": torch.__version__,
        "onnx_opset": 17,
        "bn_folded": True,
        "command": command,
    }
    json_path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {json_path}", flush=True)
    print(json.dumps(info, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
