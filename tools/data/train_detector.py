"""Train a small YOLOv8-style detector (models/tiny_detector.py) on synthetic scenes of Fashion-MNIST items
(tools/data/det_scenes.py) within a wall-clock budget, on one CPU thread.

Run from the repository root::

    python -m tools.data.train_detector --layout concat --minutes 12       # models/yolo8_fmnist.onnx
    python -m tools.data.train_detector --layout split --plain --minutes 10  # models/detsplit_fmnist.onnx

Recipe: scenes made on the fly from the 60,000 training items (letterboxed to 128x128); assignment by centre
sampling (an anchor is positive for a box when its centre lies inside the box and within 2.5 strides of the
box centre; the smallest box wins); class loss BCE with the IoU of the predicted box as the positive target
(quality target, as in VFL/TAL); box loss GIoU + DFL (or L1 on the side distances with --plain). AdamW, cosine
schedule with warm-up. The number of steps is estimated from the first timed steps to fit the budget.

Writes the .onnx (BN folded, classic exporter, opset 17, dynamic batch), its recipe .json (mAP@0.5 against the
ground truth on 500 scenes of Fashion-MNIST test items, onnxruntime), and (once, shared by both layouts) two
folders of letterboxed test-item scenes as 128x128 PNGs (exact model input at the tool's default image scaling
/255): examples/yolo8_fmnist_calib and examples/yolo8_fmnist_eval (64 each; boxes and classes in boxes.json).
"""
from __future__ import annotations

import os

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

from models.tiny_detector import TinyDetector, export_onnx  # noqa: E402
from tools.data import det_scenes as ds  # noqa: E402
from tools.bench import detections as dt  # noqa: E402
from tools.data.fmnist import load_fmnist  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SIZE = 128


def _giou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a, b (k, 4) xyxy -> (iou, giou) (k,)."""
    lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_a, area_b = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1), (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    union = area_a + area_b - inter + 1e-7
    iou = inter / union
    clt, crb = torch.min(a[:, :2], b[:, :2]), torch.max(a[:, 2:], b[:, 2:])
    hull = (crb - clt).prod(1) + 1e-7
    return iou, iou - (hull - union) / hull


def assign(anc_px: torch.Tensor, strides: torch.Tensor, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre sampling. anc_px (A, 2) anchor centres in pixels, strides (A,), boxes (k, 4) -> (gt index per
    anchor (A,), -1 = background; positive mask (A,))."""
    a = anc_px.shape[0]
    if len(boxes) == 0:
        return torch.full((a,), -1, dtype=torch.long), torch.zeros(a, dtype=torch.bool)
    b = torch.from_numpy(boxes)
    x, y = anc_px[:, 0:1], anc_px[:, 1:2]
    inside = (x > b[:, 0]) & (x < b[:, 2]) & (y > b[:, 1]) & (y < b[:, 3])
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    r = 2.5 * strides[:, None]
    near = ((x - cx).abs() < r) & ((y - cy).abs() < r)
    ok = inside & near
    area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[None].expand(a, -1)
    cost = torch.where(ok, area, torch.full_like(area, float("inf")))
    best = cost.argmin(1)
    pos = ok.any(1)
    return torch.where(pos, best, torch.full_like(best, -1)), pos


def loss_fn(model: TinyDetector, x: torch.Tensor, boxes: list, classes: list) -> torch.Tensor:
    outs = model(x, raw=True)
    n = x.shape[0]
    box = torch.cat([b.flatten(2) for b, _ in outs], 2)          # (N, nb, A)
    cls = torch.cat([c.flatten(2) for _, c in outs], 2)          # (N, C, A)
    anc, st = model.anchors()
    st1 = st[:, 0]
    d = model.distances(box)                                     # (N, 4, A) grid units
    c = anc.t().unsqueeze(0)
    pred = torch.cat([(c - d[:, :2]) * st.t(), (c + d[:, 2:]) * st.t()], 1).transpose(1, 2)  # (N, A, 4) px
    anc_px = anc * st
    target = torch.zeros_like(cls)
    l_box, l_dfl, npos = x.new_zeros(()), x.new_zeros(()), 0
    for i in range(n):
        gi, pos = assign(anc_px, st1, boxes[i])
        if not pos.any():
            continue
        gt = torch.from_numpy(boxes[i])[gi[pos]]
        iou, giou = _giou(pred[i, pos], gt)
        l_box = l_box + (1 - giou).sum()
        target[i, torch.from_numpy(classes[i])[gi[pos]], pos.nonzero()[:, 0]] = iou.detach().clamp(min=0.05)
        # side distances of the target in grid units (l, t, r, b)
        ap, sp = anc_px[pos], st1[pos][:, None]
        tl = torch.cat([ap - gt[:, :2], gt[:, 2:] - ap], 1) / sp
        if model.dfl:
            t = tl.clamp(0, model.reg_max - 1.01)
            logits = box[i, :, pos].t().reshape(-1, 4, model.reg_max)   # (p, 4, R)
            lo = t.floor().long()
            wl = lo + 1 - t
            lp = F.log_softmax(logits, -1)
            l_dfl = l_dfl - (lp.gather(-1, lo[..., None])[..., 0] * wl
                             + lp.gather(-1, (lo + 1)[..., None])[..., 0] * (1 - wl)).mean(1).sum()
        else:
            l_dfl = l_dfl + F.smooth_l1_loss(d[i, :, pos].t(), tl, reduction="none").mean(1).sum()
        npos += int(pos.sum())
    l_cls = F.binary_cross_entropy_with_logits(cls, target, reduction="sum")
    k = max(npos, 1)
    return (l_cls + 5.0 * l_box + 1.0 * l_dfl) / k


def write_folder(dest: Path, x: np.ndarray, boxes: list, classes: list) -> None:
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(x):
        Image.fromarray(np.round(img.transpose(1, 2, 0) * 255).astype(np.uint8)).save(dest / f"scene_{i:03d}.png",
                                                                                        optimize=True)
    (dest / "boxes.json").write_text(json.dumps(
        [{"boxes": b.round(2).tolist(), "classes": c.tolist()} for b, c in zip(boxes, classes)]))


def evaluate(onnx_path: str, layout: str, x: np.ndarray, boxes: list, classes: list) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
    dets = []
    for b in range(0, len(x), 50):
        outs = sess.run(None, {"images": x[b:b + 50]})
        dets += dt.decode_yolov8(outs[0]) if layout == "concat" else dt.decode_split(outs[0], outs[1])
    return {"map50": round(dt.average_precision(dets, boxes, classes), 4),
            "detections_per_scene": round(float(np.mean([len(d) for d in dets])), 2),
            "objects_per_scene": round(float(np.mean([len(c) for c in classes])), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", choices=("concat", "split"), default="concat")
    ap.add_argument("--plain", action="store_true", help="plain box regression instead of DFL")
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    name = args.name or ("yolo8_fmnist" if args.layout == "concat" else "detsplit_fmnist")
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    items, labels = load_fmnist("train")
    model = TinyDetector(10, SIZE, args.layout, dfl=not args.plain)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    budget = args.minutes * 60
    t0, step, total, seen = time.time(), 0, None, 0
    losses = []
    while True:
        el = time.time() - t0
        if step == 20:
            total = max(50, int(20 * budget / el))
        if total is not None and step >= total:
            break
        frac = step / (total or 10 ** 9)
        warm = min(1.0, (step + 1) / 100)
        for g in opt.param_groups:
            g["lr"] = args.lr * warm * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        x, bx, cl = ds.scene_batch(rng, items, labels, args.batch_size, SIZE)
        model.train()
        loss = loss_fn(model, torch.from_numpy(x), bx, cl)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        seen += len(x)
        if step % 50 == 0:
            print(f"step {step}/{total} loss {np.mean(losses[-50:]):.3f} {time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0
    out = REPO / "models" / f"{name}.onnx"
    export_onnx(model, str(out))
    test_items, test_labels = load_fmnist("test")
    ex, eb, ec = ds.scene_batch(np.random.default_rng(10_000), test_items, test_labels, 500, SIZE)
    result = evaluate(str(out), args.layout, ex, eb, ec)
    for split, seed in (("calib", 20_000), ("eval", 30_000)):  # the same scenes for every layout
        folder = REPO / "examples" / f"yolo8_fmnist_{split}"
        if not (folder / "boxes.json").is_file():
            x, b, c = ds.scene_batch(np.random.default_rng(seed), test_items, test_labels, 64, SIZE)
            write_folder(folder, x, b, c)
    recipe = {"model": f"models/{name}.onnx", "layout": args.layout, "dfl": not args.plain, "input": [1, 3, SIZE, SIZE],
              "classes": 10, "test_scenes": 500, **result, "train_steps": step, "train_scenes_seen": seen,
              "train_seconds": round(train_s, 1), "batch_size": args.batch_size, "lr": args.lr,
              "optimizer": "AdamW weight decay 0.01, 100-step warm-up, cosine to 0, grad clip 10",
              "loss": "BCE (IoU quality target) + 5 GIoU + " + ("DFL" if not args.plain else "smooth L1 on ltrb"),
              "assignment": "centre sampling: inside the box and within 2.5 strides of its centre, smallest box wins",
              "data": "tools/data/det_scenes.py scenes of Fashion-MNIST train items, letterboxed to 128 (grey 114)",
              "final_loss": round(float(np.mean(losses[-50:])), 4), "seed": args.seed, "threads": 1,
              "torch_version": torch.__version__, "onnx_opset": 17, "bn_folded": True,
              "calib": "examples/yolo8_fmnist_calib", "eval": "examples/yolo8_fmnist_eval",
              "command": "python -m tools.data.train_detector " + shlex.join(sys.argv[1:] if argv is None else argv)}
    (REPO / "models" / f"{name}.json").write_text(json.dumps(recipe, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
