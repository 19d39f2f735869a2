"""The third-party corpus benchmark (tools/data/real_models.py's models): the "Third-party models" and
"Detectors" sections of docs/BENCHMARKS.md.

    python -m tools.bench.real_models bench NAME [--remove 2] [--n 16] [--finetune-epochs 1] [-- ONNX-CPRUNE OPTIONS]
    python -m tools.bench.real_models table          # markdown rows from .cache/real-models/*/bench/row.json
    python -m tools.bench.real_models detect-table [NAME ...] [--runs ...]  # issue 20 (tools/bench/detector.py)

bench: prune with the tool's CLI, then compare the written model with the original on the eval split in the task's
own terms (decoded strings for OCR, text regions and detections kept for detectors, top-1 agreement for
classifiers, cosine for embeddings), MACs at the eval data's shapes, latency at batch 1 on the first eval sample.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from tools.bench import detections as dt
from tools.data.real_models import DETECTORS, REGISTRY, REPO, calib, detector_data, fetch


def _ctc_decode(logits: np.ndarray, time_axis: int) -> list[tuple[int, ...]]:
    """Greedy CTC decode (blank 0, repeats collapsed), as rapidocr's CTCLabelDecode and ddddocr do.
    logits: (..., classes) with one sample axis and one time axis; returns one index sequence per sample."""
    ids = logits.argmax(-1)  # (N, T) or (T, N)
    if time_axis == 0:
        ids = ids.T
    out = []
    for row in ids:
        seq, prev = [], -1
        for c in row.tolist():
            if c != prev and c != 0:
                seq.append(c)
            prev = c
        out.append(tuple(seq))
    return out


def _edit(a, b) -> int:
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[-1]


def _ocr_terms(time_axis):
    def f(ya: list, yb: list) -> dict:
        sa = [s for y in ya for s in _ctc_decode(y[0], time_axis)]
        sb = [s for y in yb for s in _ctc_decode(y[0], time_axis)]
        chars = sum(max(len(a), 1) for a in sa)
        return {"strings_equal": float(np.mean([a == b for a, b in zip(sa, sb)])),
                "char_error_rate": sum(_edit(a, b) for a, b in zip(sa, sb)) / chars, "n": len(sa)}
    return f


def _classifier_terms(ya, yb) -> dict:
    a = np.concatenate([y[0].reshape(len(y[0]), -1) for y in ya]).argmax(1)
    b = np.concatenate([y[0].reshape(len(y[0]), -1) for y in yb]).argmax(1)
    return {"top1_agreement": float((a == b).mean()), "n": len(a)}


def _embedding_terms(ya, yb) -> dict:
    a = np.concatenate([y[0] for y in ya]).astype(np.float64)
    b = np.concatenate([y[0] for y in yb]).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    # retrieval: each sentence's nearest neighbour among the others, original vs pruned embeddings
    def nn(e):
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "nearest_neighbour_same": float((nn(a) == nn(b)).mean()), "n": len(a)}


def _db_terms(ya, yb) -> dict:
    """ppocr_det: DB probability map binarised at rapidocr's thresh 0.3; text regions (connected components of at
    least 3 pixels) of the original kept when a region of the pruned map overlaps it with IoU >= 0.5
    (tools/bench/detections.py db_regions, regions_kept)."""
    ra, rb, ious = [], [], []
    for a, b in zip(ya, yb):
        for pa, pb in zip(a[0][:, 0], b[0][:, 0]):
            ma, mb = pa > 0.3, pb > 0.3
            ious.append((ma & mb).sum() / max((ma | mb).sum(), 1))
            ra.append(dt.db_regions(pa))
            rb.append(dt.db_regions(pb))
    return {"regions_kept": dt.regions_kept(ra, rb), "regions": sum(len(r) for r in ra),
            "mask_iou": float(np.mean(ious)), "n": len(ious)}


def _yolox_terms(ya, yb) -> dict:
    """ddddocr_det: ddddocr's decode (tools/bench/detections.py decode_yolox); detections of the original kept
    (IoU >= 0.5, one-to-one) and the pruned model's unmatched extra detections."""
    da = [d for y in ya for d in dt.decode_yolox(y[0])]
    db = [d for y in yb for d in dt.decode_yolox(y[0])]
    hits = [dt.match(a, b) for a, b in zip(da, db)]
    total = sum(len(a) for a in da)
    return {"detections_kept": sum(hits) / max(total, 1), "detections": total,
            "extra_detections": sum(len(b) - h for b, h in zip(db, hits))}


TASK_TERMS: dict[str, Callable] = {
    "ppocr_det": _db_terms, "ppocr_cls": _classifier_terms, "ppocr_rec": _ocr_terms(1),
    "ddddocr_ocr": _ocr_terms(0), "ddddocr_det": _yolox_terms, "magika": _classifier_terms,
    "minilm": _embedding_terms, "zoo_resnet50": _classifier_terms, "zoo_inception_v2": _classifier_terms,
}


def _outputs(model_path: Path, data, batch: int) -> list:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    return [sess.run(None, feeds) for feeds in data.batches(batch)]


def bench(name: str, remove: int = 2, n: int = 16, finetune_epochs: int = 0, extra: tuple[str, ...] = (),
          timeout: int = 1200) -> dict:
    """Prune NAME with ``onnx-cprune prune --remove REMOVE`` on an n-sample calibration folder (and, with
    finetune_epochs, one more run with ``--finetune-epochs --eval``), then measure the written model against the
    original on an n-sample eval folder. Returns a dict (the row); files under .cache/real-models/NAME/bench/."""
    import onnx

    from onnx_consensus import load_calibration
    from onnx_consensus.bench import measure_latency
    from onnx_consensus import count_cost

    m = REGISTRY[name]
    path = fetch(name)
    cal = calib(name, "calib", n, m.folder / f"calib{n}")
    ev = calib(name, "eval", n, m.folder / f"eval{n}")
    work = m.folder / "bench"
    work.mkdir(exist_ok=True)
    model = onnx.load(str(path))
    data = load_calibration(str(ev), model)
    batch = m.fixed_batch or 8
    ref = _outputs(path, data, batch)
    first = next(iter(data.batches(1)))
    shapes = {k: tuple(v.shape) for k, v in first.items() if v.ndim > 0}
    row: dict = {"name": name, "kind": m.kind, "true_blocks": m.true_blocks, "calib_samples": n,
                 "eval_samples": len(data), "input_shapes": shapes}
    cost0 = count_cost(model, shapes)
    row["macs_before"], row["params_before"] = cost0.total_macs, cost0.params
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    runs = [("pruned", ())]
    if finetune_epochs:
        runs.append(("distilled", ("--finetune-epochs", str(finetune_epochs), "--eval", str(ev))))
    for tag, more in runs:
        cal_run = _without_labels(cal, work / "calib_nolabels") if tag == "distilled" else cal
        out, rep = work / f"{tag}.onnx", work / f"{tag}.json"
        for p in (out, rep):
            if p.exists():
                p.unlink()
        cmd = [sys.executable, "-m", "onnx_consensus.cli", "prune", str(path), str(out), "--calib", str(cal_run),
               "--remove", str(remove), "--threads", "1", "--no-latency", "--report", str(rep), *extra, *more]
        row[f"{tag}_command"] = " ".join(["onnx-cprune"] + [os.path.relpath(c, REPO) if c.startswith(str(REPO))
                                                             else c for c in cmd[3:]])
        import time

        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        row[f"{tag}_seconds"] = round(time.time() - t0, 1)
        row[f"{tag}_exit"] = proc.returncode
        row[f"{tag}_stdout"] = proc.stdout[-2000:] + proc.stderr[-1000:]
        report = json.loads(rep.read_text()) if rep.is_file() else None
        if report:
            row["blocks_found"] = len(report["candidates"])
            row[f"{tag}_removed"] = report["removed_ids"]
            ft = report.get("finetune") or {}
            if ft:
                row[f"{tag}_finetune"] = {k: ft.get(k) for k in ("mode", "kept", "best_epoch", "metric",
                                                                 "metric_before", "metric_after", "losses",
                                                                 "bn_stats", "seconds", "train_samples")}
        if not out.is_file():
            continue
        pm = onnx.load(str(out))
        cost = count_cost(pm, shapes)
        row[f"{tag}_macs"], row[f"{tag}_params"] = cost.total_macs, cost.params
        outs = _outputs(out, data, batch)
        row[f"{tag}_terms"] = TASK_TERMS[name](ref, outs)
        if data.labels is not None and TASK_TERMS[name] is _classifier_terms:
            def acc(ys):
                return float((np.concatenate([y[0] for y in ys]).argmax(1) == data.labels).mean())
            row["accuracy_before"], row[f"{tag}_accuracy"] = acc(ref), acc(outs)
        if tag == "pruned":
            lat = measure_latency([model, pm], first, runs=20, warmup=3, threads=1)
            row["latency_ms_before"], row["latency_ms_after"] = lat[0].median_ms, lat[1].median_ms
    (work / "row.json").write_text(json.dumps(row, indent=1, default=str))
    return row


def _without_labels(folder: Path, dest: Path) -> Path:
    """``folder`` as a calibration folder without labels.npy (copies of its other files: symbolic links out of
    a data folder are read only with --follow-symlinks), so that the fine-tuning run distils from the original
    model even where the data has true labels (ppocr_cls)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in Path(folder).iterdir():
        if f.name != "labels.npy":
            shutil.copyfile(f, dest / f.name)
    return dest


def _terms_text(t: dict | None, acc: tuple | None = None) -> str:
    if not t:
        return "not measured"
    parts = []
    for k, v in t.items():
        if k in ("n", "regions", "detections"):
            continue
        parts.append(f"{k.replace('_', ' ')} {v:.3f}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}")
    if "detections" in t:
        parts.append(f"of {t['detections']} detections")
    if "regions" in t:
        parts.append(f"of {t['regions']} regions")
    if acc is not None:
        parts.append(f"accuracy {acc[0]:.3f} -> {acc[1]:.3f}")
    return ", ".join(parts) + f" (n={t.get('n', '?')})" if "n" in t else ", ".join(parts)


def table() -> str:
    """The markdown rows of docs/BENCHMARKS.md "Third-party models" from the bench/row.json files."""
    lines = ["| model | blocks found / independent count | removed | MACs per sample (at) | latency b1, ms "
             "(loaded) | fidelity, pruned | after 1 distillation epoch (what was written) |",
             "|---|---|---|---|---|---|---|"]
    for name in (n for n, m in REGISTRY.items() if not m.local):  # third-party models only
        f = REGISTRY[name].folder / "bench" / "row.json"
        if not f.is_file() and name == "ddddocr_ocr_q":
            lines.append(f"| `{name}` | 8 / 8 | quantized: pruned without fine-tuning since issue 23, not benchmarked "
                         "yet | | | | |")
            continue
        if not f.is_file() and REGISTRY[name].true_blocks == 0:
            lines.append(f"| `{name}` | 0 / 0 | nothing to remove (no residual block) | | | | |")
            continue
        if not f.is_file():
            lines.append(f"| `{name}` | not measured by the deadline | | | | | |")
            continue
        r = json.loads(f.read_text())
        found = r.get("blocks_found", "?")
        removed = ", ".join(f"`{x}`" for x in r.get("pruned_removed", []))
        if r.get("pruned_exit"):
            err = [ln for ln in r.get("pruned_stdout", "").splitlines() if "error" in ln.lower()][-1:] or [""]
            removed = f"nothing written, exit {r['pruned_exit']}: {err[0].strip()}"
        mb, ma = r.get("macs_before"), r.get("pruned_macs")
        shape = "; ".join(f"{k} {'x'.join(map(str, v))}" for k, v in r["input_shapes"].items())
        macs = (f"{mb:,} -> {ma:,} ({100 * (ma - mb) / mb:+.2f}%)" if mb and ma else f"{mb:,}" if mb else "unknown")
        lb, la = r.get("latency_ms_before"), r.get("latency_ms_after")
        lat = f"{lb:.1f} -> {la:.1f}" if lb and la else "not measured"
        a0 = r.get("accuracy_before")
        pr = _terms_text(r.get("pruned_terms"), (a0, r["pruned_accuracy"]) if a0 is not None else None)
        di = (_terms_text(r.get("distilled_terms"), (a0, r["distilled_accuracy"]) if a0 is not None else None)
              if "distilled_exit" in r
              else "not run")
        if "distilled_exit" in r and r["distilled_exit"] != 0:
            di = f"exit {r['distilled_exit']}"
        elif r.get("distilled_finetune") or (REGISTRY[name].folder / "bench" / "distilled.json").is_file():
            ft = r.get("distilled_finetune") or json.loads(
                (REGISTRY[name].folder / "bench" / "distilled.json").read_text()).get("finetune") or {}
            losses = sorted({x["loss"].replace("_", " ") for x in ft.get("losses") or []})
            di += (f"; {ft.get('mode')}" + (f" ({', '.join(losses)})" if losses else "") +
                   (", pruned model kept: the epoch did not beat it" if ft.get("kept") == "pruned" else ""))
        lines.append(f"| `{name}` | {found} / {r['true_blocks']} | {removed} | {macs} ({shape}) | {lat} | {pr} | "
                     f"{di} |")
    return "\n".join(lines)


def detect_rows(names: tuple[str, ...], runs: tuple[str, ...], fresh: bool = False) -> list[dict]:
    """tools/bench/detector.py's runs on each named detector (rows cached under .cache/real-models/NAME/detbench/)."""
    from tools.bench.detector import bench_detector

    rows = []
    for name in names:
        path, cal, ev = detector_data(name)
        rows += bench_detector(name, path, cal, ev, REGISTRY[name].folder / "detbench", runs, fresh=fresh)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench.real_models", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="prune --remove N and measure in the task's own terms (docs/BENCHMARKS.md)")
    b.add_argument("name")
    b.add_argument("--remove", type=int, default=2)
    b.add_argument("--n", type=int, default=16, help="calibration and eval samples")
    b.add_argument("--finetune-epochs", type=int, default=0)
    sub.add_parser("table", help="markdown rows from the bench results (.cache/real-models/*/bench/row.json)")
    d = sub.add_parser("detect-table", help="issue 20: detections kept by the tool's runs on the detectors "
                       "(tools/bench/detector.py; docs/BENCHMARKS.md, Detectors)")
    d.add_argument("names", nargs="*", help=f"default: {', '.join(DETECTORS)}")
    d.add_argument("--runs", default="remove1,remove2,default,single,distill")
    d.add_argument("--fresh", action="store_true", help="ignore cached rows of this code version")
    d.add_argument("--json", action="store_true", help="print the rows as JSON instead of the markdown table")
    args, extra = ap.parse_known_args(argv)  # bench: unknown options go to onnx-cprune prune
    if extra and args.cmd != "bench":
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd == "bench":
        extra = tuple(a for a in extra if a != "--")
        row = bench(args.name, args.remove, args.n, args.finetune_epochs, extra)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_stdout")}, indent=1, default=str))
        return 0
    if args.cmd == "table":
        print(table())
        return 0
    if args.cmd == "detect-table":
        rows = detect_rows(tuple(args.names or DETECTORS), tuple(args.runs.split(",")), args.fresh)
        from tools.bench.detector import markdown

        print(json.dumps(rows, indent=1) if args.json else markdown(rows))
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
