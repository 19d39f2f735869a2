"""Fashion-MNIST as token sequences, and the two token reference models trained on them.

Tokens: each 28x28 image becomes 49 tokens, the mean of each 4x4 patch in row-major order quantised to
15 levels (ids 1..15; id 0 is reserved for padding). Trailing dark tokens (level 1: background) are
trimmed, keeping at least 21, so sequences have natural variable lengths; a calibration set stores them in
.npz files bucketed by length (one length per file, padded to the bucket with padding_mask True).

Models (models/tiny_transformers.py):
* ``PostLNEncoder`` (torch.nn.TransformerEncoder, norm_first=False, padding mask) classifies the image;
* ``PreLNDecoder`` (causal mask) predicts the next token of the full 49-token sequence.

Run from the repository root::

    python -m tools.data.train_tokens encoder --minutes 8
    python -m tools.data.train_tokens decoder --minutes 6

Writes models/postln_fmnist_tokens.onnx / models/decoder_fmnist_tokens.onnx (dynamo exporter, dynamic batch
and sequence axes) with a .json sidecar each, and examples/fmnist_tokens/ (512 training sequences: input_ids,
padding_mask, labels) and examples/fmnist_tokens_dec/ (512 full-length sequences, input_ids only).
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

SEQ = 49
VOCAB = 16
MIN_LEN = 21
BUCKETS = (28, 35, 42, 49)


def to_tokens(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 28, 28) -> (ids int64 (N, 49) in 1..15, lengths (N,) after trimming trailing background)."""
    patches = images.reshape(len(images), 7, 4, 7, 4).astype(np.float32).mean(axis=(2, 4)).reshape(len(images), SEQ)
    ids = 1 + np.minimum(14, (patches * 15 / 256).astype(np.int64))
    nonbg = ids > 1
    last = np.where(nonbg.any(1), SEQ - np.argmax(nonbg[:, ::-1], axis=1), 0)
    lengths = np.clip(last, MIN_LEN, SEQ)
    return ids, lengths


def bucket_of(lengths: np.ndarray) -> np.ndarray:
    return np.array([next(b for b in BUCKETS if b >= n) for n in lengths])


def padded(ids: np.ndarray, lengths: np.ndarray, seq: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N, seq) with 0 after each length, padding_mask (N, seq) bool, True = padding)."""
    mask = np.arange(seq)[None, :] >= lengths[:, None]
    return np.where(mask, 0, ids[:, :seq]), mask


def write_encoder_set(out_dir: str, ids: np.ndarray, lengths: np.ndarray, labels: np.ndarray | None) -> None:
    """One .npz per length bucket (input_ids int64, padding_mask bool); labels.npy in file order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*.npz"):
        f.unlink()
    buckets = bucket_of(lengths)
    ordered = []
    for b in BUCKETS:
        sel = np.flatnonzero(buckets == b)
        if not len(sel):
            continue
        x, m = padded(ids[sel], lengths[sel], b)
        np.savez(out / f"len{b:02d}.npz", input_ids=x, padding_mask=m)
        ordered.append(sel)
    if labels is not None:
        np.save(out / "labels.npy", labels[np.concatenate(ordered)].astype(np.int64))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.data.train_tokens", description=__doc__.splitlines()[0])
    p.add_argument("which", choices=("encoder", "decoder"))
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    command = "python -m tools.data.train_tokens " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    import torch
    import torch.nn.functional as F

    from models.tiny_transformers import PostLNEncoder, PreLNDecoder, export_onnx
    from tools.data.fmnist import load_fmnist

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    tr_img, tr_lbl = load_fmnist("train")
    te_img, te_lbl = load_fmnist("test")
    tr_ids, tr_len = to_tokens(tr_img)
    te_ids, te_len = to_tokens(te_img)
    idx = np.random.default_rng(args.seed).choice(len(tr_img), size=512, replace=False)
    enc = args.which == "encoder"
    if enc:
        write_encoder_set("examples/fmnist_tokens", tr_ids[idx], tr_len[idx], tr_lbl[idx])
        net = PostLNEncoder(vocab=VOCAB, dim=args.dim, heads=4, depth=args.depth, ff=2 * args.dim,
                            max_len=SEQ, num_classes=10)
    else:
        os.makedirs("examples/fmnist_tokens_dec", exist_ok=True)
        np.savez("examples/fmnist_tokens_dec/seq49.npz", input_ids=tr_ids[idx])
        net = PreLNDecoder(vocab=VOCAB, dim=args.dim, heads=4, depth=args.depth, max_len=SEQ)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01)
    ids_t = torch.from_numpy(tr_ids)
    mask_t = torch.from_numpy(np.arange(SEQ)[None, :] >= tr_len[:, None])
    y_t = torch.from_numpy(tr_lbl)
    n, bs = len(ids_t), args.batch_size
    steps_per_epoch = n // bs
    start = time.perf_counter()
    total, step, done = 10**9, 0, False
    while not done:
        perm = torch.randperm(n, generator=gen)
        net.train()
        for i in range(steps_per_epoch):
            if step == 20:
                total = int(args.minutes * 60 / ((time.perf_counter() - start) / 20))
            if step >= total:
                done = True
                break
            warm = 100
            lr = args.lr * min(1.0, (step + 1) / warm) * (0.5 * (1 + math.cos(math.pi * min(1.0, step / max(total, 1))))
                                                           if step >= warm else 1.0)
            for g in opt.param_groups:
                g["lr"] = lr
            b = perm[i * bs:(i + 1) * bs]
            if enc:
                ids, mask = ids_t[b].clone(), mask_t[b]
                ids[mask] = 0
                loss = F.cross_entropy(net(ids, mask), y_t[b], label_smoothing=0.1)
            else:
                ids = ids_t[b]
                logits = net(ids[:, :-1])
                loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            step += 1
            if step % 100 == 0:
                print(f"step {step}/{total} loss {float(loss):.4f} {time.perf_counter() - start:.0f}s", flush=True)
    secs = time.perf_counter() - start
    net.eval()
    name = "postln_fmnist_tokens" if enc else "decoder_fmnist_tokens"
    path = f"models/{name}.onnx"
    export_onnx(net, path, dynamo=True, seq=24 if enc else 24, batch=4)
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        if enc:
            correct_t = correct_o = 0
            for b in BUCKETS:
                sel = np.flatnonzero(bucket_of(te_len) == b)
                x, m = padded(te_ids[sel], te_len[sel], b)
                out_t = net(torch.from_numpy(x), torch.from_numpy(m)).numpy()
                out_o = sess.run(None, {"input_ids": x, "padding_mask": m})[0]
                correct_t += int((out_t.argmax(1) == te_lbl[sel]).sum())
                correct_o += int((out_o.argmax(1) == te_lbl[sel]).sum())
            acc_t, acc_o = 100 * correct_t / len(te_lbl), 100 * correct_o / len(te_lbl)
            metric = "test top-1 accuracy (10 classes)"
        else:
            x = te_ids[:2000]
            out_t = np.concatenate([net(torch.from_numpy(x[i:i + 500, :-1])).numpy() for i in range(0, len(x), 500)])
            out_o = np.concatenate([sess.run(None, {"input_ids": x[i:i + 500, :-1]})[0] for i in range(0, len(x), 500)])
            acc_t = 100 * float((out_t.argmax(-1) == x[:, 1:]).mean())
            acc_o = 100 * float((out_o.argmax(-1) == x[:, 1:]).mean())
            metric = "next-token top-1 accuracy (first 2,000 test sequences)"
    print(f"{metric}: torch {acc_t:.2f}%, onnxruntime {acc_o:.2f}%", flush=True)
    info = {"model": type(net).__name__, "command": command, "depth": args.depth, "dim": args.dim,
            "vocab": VOCAB, "tokens": "4x4 patch means of Fashion-MNIST, 15 levels (ids 1..15), row-major",
            "params": sum(p.numel() for p in net.parameters()), "steps": step,
            "epochs": round(step / steps_per_epoch, 2), "train_seconds": round(secs, 1), "lr": args.lr,
            "batch_size": bs, "metric": metric, "torch": round(acc_t, 2), "onnxruntime": round(acc_o, 2),
            "export": "dynamo exporter, opset 18, dynamic batch and sequence"}
    Path(path).with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
