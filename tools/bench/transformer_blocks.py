"""Transformer depth-pruning benchmark: the trained pre-LN ViT (models/vit_fmnist.onnx) with 2, 4 and 6
sub-blocks removed, by onnxsim's apply_transformer_block_pruning (local cosine, ShortGPT-style) and by
our criteria (Consensus, CKA alone, cosine alone; global and local scope), on the same calibration data;
Fashion-MNIST top-1 test accuracy before and after a short distillation fine-tune through the bridge;
onnxruntime latency at batch 1 and 32. Then the post-LN check: onnxsim vs us on a post-LN encoder.

Run from the repository root (needs the bench extra: pip install -e ".[bench]")::

    python -m tools.bench.transformer_blocks --out docs/bench_transformers.json --markdown /tmp/transformers.md

Removal orders are iterative (re-scored after each removal) and deterministic, so the first k removals of
one 6-removal run are exactly a k-removal run: one prune run per criterion gives all three levels.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from onnx_consensus.bench import measure_latency  # noqa: E402
from onnx_consensus import find_blocks, load_calibration, remove_blocks  # noqa: E402
from onnx_consensus.metrics import DEFAULT_METRICS  # noqa: E402
from onnx_consensus import CriterionOptions, RunOptions, TargetOptions  # noqa: E402
from onnx_consensus.pruner import prune  # noqa: E402
from onnx_consensus.runtime import make_session  # noqa: E402

LEVELS = (2, 4, 6)
CRITERIA = [  # name, metrics, scope
    ("Consensus (global)", DEFAULT_METRICS, "global"),
    ("CKA (global)", ("cka",), "global"),
    ("cosine (global)", ("cosine",), "global"),
    ("Consensus (local)", DEFAULT_METRICS, "local"),
    ("CKA (local)", ("cka",), "local"),
    ("cosine (local)", ("cosine",), "local"),
]


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    sess = make_session(model, level="all", threads=1)
    name = sess.get_inputs()[0].name
    out = np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return float((out.argmax(1) == y).mean() * 100)


def block_labels(model: onnx.ModelProto) -> dict[str, str]:
    """Block id -> 'A3' / 'M3' (attention / MLP sub-block of layer 3, 0-based)."""
    blocks = find_blocks(model).blocks
    ops = {n.output[0]: n.op_type for n in model.graph.node}
    out, layer = {}, -1
    for b in blocks:
        attn = any(ops.get(k) == "Softmax" for k in b.nodes)
        layer += attn
        out[b.id] = f"{'A' if attn else 'M'}{layer}"
    return out


def strip_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    return out


def onnxsim_prune(model: onnx.ModelProto, calib: np.ndarray, k: int, batch: int = 64) -> onnx.ModelProto:
    import onnxsim

    batches = [{"image": calib[i:i + batch]} for i in range(0, len(calib), batch)]
    return onnxsim.apply_transformer_block_pruning(model, calibration_data=batches, num_blocks_to_drop=k)


def removed_by_onnxsim(original: onnx.ModelProto, pruned: onnx.ModelProto, labels: dict[str, str]) -> list[str]:
    """Which of our candidate blocks onnxsim dropped: those whose merge Add is gone."""
    have = {o for n in pruned.graph.node for o in n.output}
    return [labels[b.id] for b in find_blocks(original).blocks if b.merge not in have]


def distill(original: onnx.ModelProto, pruned: onnx.ModelProto, train_dir: str, *, epochs: int, lr: float,
            threads: int) -> onnx.ModelProto:
    from onnx_consensus import FinetuneConfig
    from onnx_consensus.finetune.epochs import training_batches
    from onnx_consensus.finetune.train import finetune

    data = load_calibration(train_dir, original)
    config = FinetuneConfig(epochs=epochs, lr=lr, batch_size=64, optimizer="adamw", temperature=4.0,
                            threads=threads)
    tuned, _ = finetune(pruned, training_batches(data, 64, 0), teacher=original, config=config, progress=False)
    return tuned


def _encoder_test(n: int | None = None):
    """Test split as token sequences, bucketed by length: list of (feed, labels)."""
    from tools.data.fmnist import load_fmnist
    from tools.data.train_tokens import BUCKETS, bucket_of, padded, to_tokens

    img, lbl = load_fmnist("test")
    ids, lengths = to_tokens(img if n is None else img[:n])
    lbl = lbl if n is None else lbl[:n]
    out = []
    for b in BUCKETS:
        sel = np.flatnonzero(bucket_of(lengths) == b)
        if len(sel):
            x, m = padded(ids[sel], lengths[sel], b)
            out.append(({"input_ids": x, "padding_mask": m}, lbl[sel]))
    return out


def encoder_accuracy(model: onnx.ModelProto, test) -> float:
    sess = make_session(model, level="all", threads=1)
    correct = total = 0
    for feed, y in test:
        for i in range(0, len(y), 500):
            out = sess.run(None, {k: v[i:i + 500] for k, v in feed.items()})[0]
            correct += int((out.argmax(1) == y[i:i + 500]).sum())
            total += len(y[i:i + 500])
    return 100.0 * correct / total


def post_ln_check(tmp: str, args=None) -> dict:
    """The trained post-LN token encoder (models/postln_fmnist_tokens.onnx): onnxsim finds nothing to drop;
    we remove whole layers (--unit layer) or sub-blocks, with test accuracy before / after distillation."""
    import onnxsim

    from tools.data.fmnist import load_fmnist
    from tools.data.train_tokens import to_tokens, write_encoder_set

    path = "models/postln_fmnist_tokens.onnx"
    model = onnx.load(path)
    test = _encoder_test()
    base = encoder_accuracy(model, test)
    calib = load_calibration("examples/fmnist_tokens", model)
    feeds = list(calib.batches(64))
    sim = onnxsim.apply_transformer_block_pruning(model, calibration_data=feeds, num_blocks_to_drop=2)
    sim_changed = sim.SerializeToString() != model.SerializeToString() and len(sim.graph.node) != len(model.graph.node)
    tr_img, _ = load_fmnist("train")
    idx = np.random.default_rng(2).choice(len(tr_img), size=4096, replace=False)
    ids, lengths = to_tokens(tr_img[idx])
    train_dir = os.path.join(tmp, "tok_train")
    write_encoder_set(train_dir, ids, lengths, None)  # no labels: distillation
    out = {"model": path, "original_acc": base, "onnxsim_changed_model": bool(sim_changed),
           "onnxsim_candidates": 0 if not sim_changed else None, "rows": []}
    for unit, ks in (("layer", (1, 2)), ("block", (2, 4))):
        rep = find_blocks(model, unit=unit)
        res = prune(model, calib, criterion=CriterionOptions(unit=unit), target=TargetOptions(remove=max(ks)),
                    run=RunOptions(holdout=0.0))
        blocks = [r.block for r in res.removals]
        for k in ks:
            pruned = remove_blocks(model, blocks[:k])
            acc = encoder_accuracy(pruned, test)
            tuned = distill(model, pruned, train_dir, epochs=1, lr=3e-4, threads=1)
            names = {x.id: f"{'L' if unit == 'layer' else 'AM'[i % 2]}{i if unit == 'layer' else i // 2}"
                     for i, x in enumerate(rep.blocks)}
            row = {"unit": unit, "candidates": len(rep.blocks), "removed": k, "ids": [b.id for b in blocks[:k]],
                   "blocks": [names[b.id] for b in blocks[:k]],
                   "acc": acc, "acc_ft": encoder_accuracy(tuned, test)}
            out["rows"].append(row)
            print("post-LN", row, flush=True)
    return out


def decoder_check(tmp: str, args=None) -> dict:
    """The trained pre-LN token decoder: next-token accuracy with 2 and 4 sub-blocks removed, onnxsim vs
    Consensus (global), no fine-tuning."""
    from tools.data.fmnist import load_fmnist
    from tools.data.train_tokens import to_tokens

    path = "models/decoder_fmnist_tokens.onnx"
    model = onnx.load(path)
    img, _ = load_fmnist("test")
    x = to_tokens(img[:2000])[0]

    def next_token_acc(m):
        sess = make_session(m, level="all", threads=1)
        out = np.concatenate([sess.run(None, {"input_ids": x[i:i + 500, :-1]})[0] for i in range(0, len(x), 500)])
        return 100.0 * float((out.argmax(-1) == x[:, 1:]).mean())

    calib = load_calibration("examples/fmnist_tokens_dec", model)
    feeds = list(calib.batches(64))
    labels = {b.id: lab for b, lab in zip(find_blocks(model).blocks,
                                          [f"{'AM'[i % 2]}{i // 2}" for i in range(len(find_blocks(model).blocks))])}
    out = {"model": path, "original_acc": next_token_acc(model), "rows": []}
    res = prune(model, calib, target=TargetOptions(remove=4), run=RunOptions(holdout=0.0))
    ours = [r.block for r in res.removals]
    import onnxsim

    for k in (2, 4):
        sim = onnxsim.apply_transformer_block_pruning(model, calibration_data=feeds, num_blocks_to_drop=k)
        have = {o for n in sim.graph.node for o in n.output}
        out["rows"].append({"removed": k, "method": "onnxsim", "acc": next_token_acc(sim),
                            "blocks": [labels[b.id] for b in find_blocks(model).blocks if b.merge not in have]})
        out["rows"].append({"removed": k, "method": "Consensus (global)",
                            "acc": next_token_acc(remove_blocks(model, ours[:k])),
                            "blocks": [labels[b.id] for b in ours[:k]]})
        print("decoder", out["rows"][-2:], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.transformer_blocks", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/vit_fmnist.onnx")
    p.add_argument("--calib", default="examples/fmnist_vit_calib")
    p.add_argument("--train-samples", type=int, default=4096, help="unlabelled training images for distillation")
    p.add_argument("--ft-epochs", type=int, default=1)
    p.add_argument("--ft-lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latency-runs", type=int, default=30)
    p.add_argument("--test-samples", type=int, default=10000)
    p.add_argument("--out", default="docs/bench_transformers.json")
    p.add_argument("--markdown", default=None)
    p.add_argument("--sections", type=lambda v: tuple(v.split(",")), default=("vit", "postln", "decoder"),
                   help="comma-separated: vit, postln, decoder (default all)")
    args = p.parse_args(argv)
    command = "python -m tools.bench.transformer_blocks " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    import torch

    torch.set_num_threads(args.threads)
    from tools.data.fmnist import load_fmnist
    from tools.data.train_vit import to_vit_input

    t_start = time.perf_counter()
    model = onnx.load(args.model)
    labels = block_labels(model)
    te_img, te_lbl = load_fmnist("test")
    x_test, y_test = to_vit_input(te_img[:args.test_samples]), te_lbl[:args.test_samples]
    calib_x = np.load(os.path.join(args.calib, "calib.npy"))
    data = load_calibration(args.calib, model)
    tmp = tempfile.mkdtemp(prefix="bench_tx_")
    tr_img, _ = load_fmnist("train")
    idx = np.random.default_rng(1).choice(len(tr_img), size=args.train_samples, replace=False)
    train_dir = os.path.join(tmp, "train")
    os.makedirs(train_dir)
    np.save(os.path.join(train_dir, "calib.npy"), to_vit_input(tr_img[idx]))  # no labels: distillation

    base_acc = accuracy(model, x_test, y_test)
    print(f"original: {base_acc:.2f}% ({len(labels)} sub-blocks)", flush=True)
    rows = []
    pruned_models: dict[tuple[str, int], onnx.ModelProto] = {}
    orders: dict[str, list[str]] = {}
    for name, metrics, scope in CRITERIA:
        t0 = time.perf_counter()
        res = prune(model, data, criterion=CriterionOptions(metrics=tuple(metrics), scope=scope),
                    target=TargetOptions(remove=max(LEVELS)),
                    run=RunOptions(threads=args.threads, holdout=0.0))  # all 512 images, as onnxsim gets
        secs = time.perf_counter() - t0
        blocks = [r.block for r in res.removals]
        orders[name] = [labels[b.id] for b in blocks]
        for k in LEVELS:
            pruned_models[(name, k)] = remove_blocks(model, blocks[:k])
        print(f"{name}: order {orders[name]} ({secs:.1f}s)", flush=True)
    for k in LEVELS:
        sim = onnxsim_prune(model, calib_x, k)
        pruned_models[("onnxsim", k)] = sim
        orders.setdefault("onnxsim", [])
        orders[f"onnxsim@{k}"] = removed_by_onnxsim(model, sim, labels)
        print(f"onnxsim k={k}: removed {orders[f'onnxsim@{k}']}", flush=True)
    names = ["onnxsim"] + [c[0] for c in CRITERIA]
    for k in LEVELS:
        for j, n in enumerate(names):
            m = pruned_models[(n, k)]
            acc = accuracy(m, x_test, y_test)
            t0 = time.perf_counter()
            tuned = distill(model, m, train_dir, epochs=args.ft_epochs, lr=args.ft_lr, threads=args.threads)
            ft_secs = time.perf_counter() - t0
            acc_ft = accuracy(tuned, x_test, y_test)
            removed = orders[f"onnxsim@{k}"] if n == "onnxsim" else orders[n][:k]
            row = {"removed": k, "method": n, "blocks": removed, "acc": acc, "acc_ft": acc_ft,
                   "ft_seconds": round(ft_secs, 1)}
            rows.append(row)
            print(f"k={k} {n:20s} acc {acc:6.2f}  ft {acc_ft:6.2f}  {removed}", flush=True)
    # Latency last, all models in one alternated measurement per batch size (drift hits all alike).
    # Every model without value_info: our writer keeps the shape-inference value_info, onnxsim's output has
    # none, and with it onnxruntime picks other fusions (slower here at batch 32): compare like with like.
    keys = [(n, k) for k in LEVELS for n in names]
    bare = [strip_value_info(m) for m in [model] + [pruned_models[key] for key in keys]]
    for bs in (1, 32):
        feed = {"image": np.ascontiguousarray(np.resize(calib_x, (bs,) + calib_x.shape[1:]))}
        lat = measure_latency(bare, feed, runs=args.latency_runs, warmup=10, threads=1)
        for row in rows:
            row[f"lat{bs}_ms"] = lat[1 + keys.index((row["method"], row["removed"]))].median_ms
            row[f"lat{bs}_orig_ms"] = lat[0].median_ms
    post = post_ln_check(tmp) if "postln" in args.sections else None
    print("post-LN:", post, flush=True)
    dec = decoder_check(tmp, args) if "decoder" in args.sections else None
    print("decoder:", dec, flush=True)
    out = {"command": command, "model": args.model, "original_acc": base_acc, "sub_blocks": len(labels),
           "train_samples": args.train_samples, "ft_epochs": args.ft_epochs, "ft_lr": args.ft_lr,
           "test_samples": len(y_test), "rows": rows, "orders": orders, "post_ln": post, "decoder": dec,
           "seconds": round(time.perf_counter() - t_start, 1)}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2, default=str)
    md = to_markdown(out)
    print(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    return 0


def to_markdown(out: dict) -> str:
    lines = [f"Original: {out['original_acc']:.2f}% top-1 on {out['test_samples']:,} test images, "
             f"{out['sub_blocks']} sub-blocks. Fine-tune: distillation from the original (KL, T=4), AdamW "
             f"lr {out['ft_lr']:g}, {out['ft_epochs']} epoch(s) over {out['train_samples']:,} unlabelled training "
             f"images. Latency: onnxruntime CPU, 1 thread, all models alternated, value_info stripped, median ms (original: "
             f"{out['rows'][0]['lat1_orig_ms']:.3f} at batch 1, {out['rows'][0]['lat32_orig_ms']:.3f} at batch 32).", "",
             "| removed | method | sub-blocks removed | top-1 (no FT) | top-1 (after FT) | ms @1 | ms @32 |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for r in out["rows"]:
        lines.append(f"| {r['removed']} | {r['method']} | {' '.join(r['blocks'])} | {r['acc']:.2f} | "
                     f"{r['acc_ft']:.2f} | {r['lat1_ms']:.3f} | {r['lat32_ms']:.3f} |")
    post = out.get("post_ln")
    if post:
        lines += ["", f"Post-LN encoder `{post['model']}` (original {post['original_acc']:.2f}% top-1 on the token "
                  f"test set). onnxsim: model changed = {post['onnxsim_changed_model']} (it matches pre-norm "
                  f"sub-blocks only). Consensus (global), same fine-tune recipe on 4,096 unlabelled training sequences.", "",
                  "| unit | candidates | removed | which | top-1 (no FT) | top-1 (after FT) |",
                  "|---|---:|---:|---|---:|---:|"]
        for r in post["rows"]:
            lines.append(f"| {r['unit']} | {r['candidates']} | {r['removed']} | {' '.join(r['blocks'])} | "
                         f"{r['acc']:.2f} | {r['acc_ft']:.2f} |")
    dec = out.get("decoder")
    if dec:
        lines += ["", f"Pre-LN decoder `{dec['model']}`: next-token top-1 on 2,000 test sequences (original "
                  f"{dec['original_acc']:.2f}%), no fine-tuning.", "",
                  "| removed | method | sub-blocks removed | next-token top-1 |", "|---:|---|---|---:|"]
        for r in dec["rows"]:
            lines.append(f"| {r['removed']} | {r['method']} | {' '.join(r['blocks'])} | {r['acc']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
