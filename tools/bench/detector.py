"""Issue 20, "Done when": does the tool write detectors that lose detections while it says all is fine?

For each detector of the real suite (tools/data/real_models.py DETECTORS), prune with the tool's CLI and judge the
written model the way its user would (tools/bench/detections.py: the deploying code's decode, then the share of the
original's detections on the eval split that the pruned model keeps, same class, IoU >= 0.5; DB text maps:
text regions kept). Runs per detector:

* ``remove1``, ``remove2``: ``--remove 1`` / ``--remove 2``;
* ``default``: no target (the tool's own fidelity budget decides);
* ``only:ID``: each block removed alone (``--only ID --remove 1 --keep-per-stage 0``, so that a stage's last
  block can be measured too);
* ``distill``: ``--remove 2 --finetune-epochs 1`` (distillation on the calibration data, no labels).

A run "claims fine" when it exits 0, writes a model and reports no collapse. A run is a FALSE CLAIM when it
claims fine while detections kept < 0.9 (the bug of issue 20): the default run must never write such a model,
and ``--remove N`` must never do so without a collapse warning.

    python -m tools.bench.real_models detect-table [NAME ...] [--runs remove1,remove2,default,single,distill]

Rows are cached per (model, run, code version) under .cache/real-models/NAME/detbench/ (JSON); the markdown
table goes to stdout.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from tools.bench import detections as dt

REPO = Path(__file__).resolve().parents[2]
KEPT_OK = 0.9


@dataclass(frozen=True)
class DetectorSpec:
    """How to judge one detector: ``detections(outputs)`` turns the model's outputs for a batch (list of arrays in
    graph output order) into per-image detections; ``kept(a, b)`` the share of a's detections b keeps, and
    ``count(a)`` how many detections a holds."""

    name: str
    detections: Callable[[list[np.ndarray]], list]
    kept: Callable[[list, list], float]
    count: Callable[[list], int]


def _box_count(dets: list) -> int:
    return sum(len(d) for d in dets)


def _region_count(maps: list) -> int:
    return sum(len(r) for r in maps)


SPECS: dict[str, DetectorSpec] = {
    "yolo8_fmnist": DetectorSpec("yolo8_fmnist", lambda o: dt.decode_yolov8(o[0]), dt.detections_kept, _box_count),
    "detsplit_fmnist": DetectorSpec("detsplit_fmnist", lambda o: dt.decode_split(o[0], o[1]), dt.detections_kept,
                                    _box_count),
    "ddddocr_det": DetectorSpec("ddddocr_det", lambda o: dt.decode_yolox(o[0]), dt.detections_kept, _box_count),
    "ppocr_det": DetectorSpec("ppocr_det", lambda o: [dt.db_regions(p[0]) for p in o[0]], dt.regions_kept,
                              _region_count),
}


def run_outputs(model_path: str | Path, data_dir: str | Path, batch: int | None = None) -> list[list[np.ndarray]]:
    """onnxruntime outputs of the model on a data folder (the tool's own loader, so inputs are what it feeds)."""
    import onnx
    import onnxruntime as ort

    from onnx_consensus import load_calibration

    model = onnx.load(str(model_path), load_external_data=False)
    data = load_calibration(str(data_dir), model)
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    batch = batch or (dim0.dim_value if dim0.HasField("dim_value") and dim0.dim_value > 0 else 16)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    return [sess.run(None, feeds) for feeds in data.batches(batch)]


def detect(spec: DetectorSpec, outputs: list[list[np.ndarray]]) -> list:
    return [d for o in outputs for d in spec.detections(o)]


def cli_prune(model: Path, out: Path, calib: Path, *extra: str, timeout: int = 3600) -> tuple[subprocess.CompletedProcess, dict | None, float]:
    """``onnx-cprune prune`` in a child process (this checkout's code, one thread). Returns (process, report, s)."""
    rep = out.with_suffix(".json")
    for p in (out, rep):
        if p.exists():
            p.unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "onnx_consensus", "prune", str(model), str(out), "--calib", str(calib),
           "--threads", "1", "--no-latency", "-q", "--report", str(rep), *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=out.parent)
    report = json.loads(rep.read_text()) if rep.is_file() else None
    return proc, report, time.time() - t0


def collapse_said(proc: subprocess.CompletedProcess, report: dict | None) -> bool:
    """The run warned that the model collapsed (report "collapse", or the word in its output)."""
    return bool((report or {}).get("collapse")) or "collaps" in (proc.stdout + proc.stderr).lower()


def judge(spec: DetectorSpec, ref_dets: list, out: Path, eval_dir: Path) -> dict:
    """Detections kept by the written model against the original's on the eval folder."""
    dets = detect(spec, run_outputs(out, eval_dir))
    return {"kept": round(spec.kept(ref_dets, dets), 4), "detections": spec.count(ref_dets),
            "pruned_detections": spec.count(dets)}


def _fidelity_text(report: dict | None) -> str:
    """What the tool said about fidelity on its hold-out: its measure when the report names one (the per-kind
    measures of issue 20: detections kept, text-map IoU, ...), else the cosine / top-1 agreement of older code."""
    fid = (report or {}).get("fidelity") or {}
    m = fid.get("measure")
    if isinstance(m, dict) and isinstance(m.get("value"), (int, float)):
        return f"{m.get('name', 'measure')} {m['value']:.4f}"
    for k in ("agreement", "cosine"):
        if isinstance(fid.get(k), (int, float)):
            return f"{k} {fid[k]:.4f}"
    return ""


def one_run(spec: DetectorSpec, model: Path, calib: Path, eval_dir: Path, ref_dets: list, work: Path, tag: str,
            extra: tuple[str, ...]) -> dict:
    """Prune once and judge: the row of the table (JSON-able)."""
    out = work / f"{tag.replace(':', '_').replace('/', '_')}.onnx"
    proc, report, secs = cli_prune(model, out, calib, *extra)
    row = {"model": spec.name, "run": tag, "args": " ".join(extra), "exit": proc.returncode,
           "seconds": round(secs, 1), "written": out.is_file(), "collapse_warning": collapse_said(proc, report),
           "removed": (report or {}).get("removed_ids", []), "tool_fidelity": _fidelity_text(report),
           "stop_reason": (report or {}).get("stop_reason")}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or [""])[-1][:300]
    if out.is_file():
        row.update(judge(spec, ref_dets, out, eval_dir))
        cost = (report or {}).get("macs") or {}
        row["macs"] = cost
    row["claims_fine"] = bool(row["exit"] == 0 and row["written"] and not row["collapse_warning"])
    row["false_claim"] = bool(row["claims_fine"] and row.get("kept", 1.0) < KEPT_OK)
    return row


def code_version() -> str:
    """The package's code version: the git tree hash of onnx_consensus/ at HEAD (commits that touch only tools or
    docs keep it), "+dirty" when the package has uncommitted changes. Rows are cached per version."""
    tree = subprocess.run(["git", "rev-parse", "--short", "HEAD:onnx_consensus"], cwd=REPO, capture_output=True,
                          text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "onnx_consensus"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return "pkg-" + tree.strip() + ("+dirty" if dirty else "")


RUNS = ("remove1", "remove2", "default", "single", "distill")


def plan(blocks: list[str], runs: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    """(tag, extra CLI args) of every run asked for."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for r in runs:
        if r == "remove1":
            out.append(("remove1", ("--remove", "1")))
        elif r == "remove2":
            out.append(("remove2", ("--remove", "2")))
        elif r == "default":
            out.append(("default", ()))
        elif r == "single":
            out += [(f"only:{b}", ("--only", b, "--remove", "1", "--keep-per-stage", "0")) for b in blocks]
        elif r == "distill":
            out.append(("distill", ("--remove", "2", "--finetune-epochs", "1")))
        else:
            raise ValueError(f"unknown run {r!r}: one of {', '.join(RUNS)}")
    return out


def bench_detector(name: str, model: Path, calib: Path, eval_dir: Path, work: Path,
                   runs: tuple[str, ...] = RUNS, extra: tuple[str, ...] = (), fresh: bool = False) -> list[dict]:
    """Every run of ``plan`` on one detector; rows cached in work/rows.json per code version and args."""
    import onnx

    from onnx_consensus import find_blocks

    spec = SPECS[name]
    work.mkdir(parents=True, exist_ok=True)
    cache_file = work / "rows.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() and not fresh else {}
    version = code_version()
    ref_dets = detect(spec, run_outputs(model, eval_dir))
    blocks = [b.id for b in find_blocks(onnx.load(str(model))).blocks]
    rows = []
    for tag, args in plan(blocks, runs):
        args = (*args, *extra)
        key = f"{version}|{tag}|{' '.join(args)}"
        if key not in cache:
            cache[key] = one_run(spec, model, calib, eval_dir, ref_dets, work, tag, args)
            cache[key]["code"] = version
            cache_file.write_text(json.dumps(cache, indent=1))
        rows.append(cache[key])
    return rows


def _macs_text(r: dict) -> str:
    m = r.get("macs") or {}
    return f"{100 * (m['ratio'] - 1):+.1f}%" if m.get("ratio") else "-"


def markdown(rows: list[dict]) -> str:
    """The table of docs/BENCHMARKS.md "Detectors": one line per run, then per model the runs that claim fine
    while keeping < 0.9 of the detections."""
    lines = ["| model | run | exit | collapse warning | removed | MACs | tool's fidelity (hold-out) | "
             "detections kept (of) | false claim |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = f"{r['kept']:.3f} ({r['detections']})" if "kept" in r else "nothing written"
        removed = ", ".join(f"`{b}`" for b in r.get("removed", [])) or "-"
        run = "alone" if r["run"].startswith("only:") else r["run"]
        lines.append(f"| `{r['model']}` | {run} | {r['exit']} | {'yes' if r['collapse_warning'] else 'no'} | "
                     f"{removed} | {_macs_text(r)} | {r.get('tool_fidelity') or '-'} | {kept} | "
                     f"{'**yes**' if r['false_claim'] else 'no'} |")
    return "\n".join(lines)
