"""Peak memory of pruning runs: against the samples and the input size, and on a large model with and without
shared weights.

    python -m tools.bench.memory runs [--det-samples 16,32,64] [--resnet-samples 64,256,512] [--max-memory 6G]
    python -m tools.bench.memory [--blocks 16] [--width 4096]

``runs``: `onnx-cprune --remove 1 --threads 1 --no-latency` on the rapidocr text detector (``ppocr_det`` of
``tools.data.real_models``, fetched) at its native 736x736 input (document pages rendered as ``tools.data.real_models``
does, resized to 736x736) and on models/resnet56_fmnist.onnx (examples/fmnist_calib), each run its own process;
prints the batch the run chose, its estimated peak (the report's ``memory``) and the measured peak RSS
(``os.wait4``'s ru_maxrss of that process), and the wall time.

Builds a residual MLP (``blocks`` blocks of x + Relu(x W_k), W_k (width x width) float32: 64 MB each at
width 4096) and scores it with `cka` on 64 random samples, once with every suffix session holding its own
weights and once with one shared copy (runtime.SharedWeights). Each run is a separate process; peak RSS is
its own. Prints the model's weight size and both peaks.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(blocks: int, width: int, path: str) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for k in range(blocks):
        w = (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width) * 0.3).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{k}"))
        nodes += [helper.make_node("MatMul", [x, f"w{k}"], [f"m{k}"]), helper.make_node("Relu", [f"m{k}"], [f"r{k}"]),
                  helper.make_node("Add", [x, f"r{k}"], [f"h{k}"])]
        x = f"h{k}"
    inits.append(numpy_helper.from_array(rng.standard_normal((width, 10), dtype=np.float32) * 0.01, "head"))
    nodes.append(helper.make_node("MatMul", [x, "head"], ["logits"]))
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def child(cfg: dict) -> dict:
    import onnx

    from onnx_consensus import find_blocks, load_calibration
    from onnx_consensus.scoring import collect_features

    model = onnx.load(cfg["model"])
    data = load_calibration(cfg["calib"], model)
    blocks = find_blocks(model, macs_per_node={}).blocks
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    collect_features(model, data, blocks, batch_size=32, threads=2, share_weights=cfg["share"])
    return {"share": cfg["share"], "blocks": len(blocks), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_load_mb": rss_model}


def _det_pages(n: int, folder: str, size: int = 736) -> str:
    """n rendered document pages at size x size, preprocessed as ``tools.data.real_models._ppocr_det_inputs``."""
    import numpy as np

    from tools.data import real_inputs as ri
    from tools.data.real_models import _bgr_chw

    rng = np.random.default_rng(7)
    xs = [(_bgr_chw(ri.render_page((size, size), rng, n_lines=16)) / 255.0 - 0.5) / 0.5 for _ in range(n)]
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "pages.npy"), np.stack(xs).astype(np.float32))
    return folder


def _measured_run(model: str, calib: str, max_memory: str | None, work: str) -> dict:
    """One `onnx-cprune --remove 1` run in its own process: its peak RSS (MB), wall seconds, exit code, and
    the report's memory record."""
    import time

    report = os.path.join(work, "report.json")
    cmd = [sys.executable, "-m", "onnx_consensus", model, os.path.join(work, "out.onnx"), "--calib", calib,
           "--remove", "1", "--threads", "1", "--no-latency", "-q", "--report", report]
    if max_memory:
        cmd += ["--max-memory", max_memory]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    mem = json.load(open(report)).get("memory") if os.path.exists(report) else None
    return {"peak_mb": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - t0,
            "exit": os.waitstatus_to_exitcode(status), "memory": mem, "stderr": err.strip().splitlines()[-1:]}


def prepare(work: str, det_samples, resnet_samples) -> list[tuple[str, str, str, int]]:
    """The runs' data folders under ``work``: (label, model, folder, samples) per run."""
    import numpy as np

    from tools.data.real_models import fetch

    det = str(fetch("ppocr_det"))
    pages = np.load(os.path.join(_det_pages(max(det_samples), os.path.join(work, "pages")), "pages.npy"))
    calib = np.load(os.path.join(HERE, "examples", "fmnist_calib", "calib.npy"))
    cases = []
    for label, model, arrays, counts in (("ppocr_det 3x736x736", det, pages, det_samples),
                                         ("resnet56_fmnist 3x32x32", os.path.join(HERE, "models",
                                                                                   "resnet56_fmnist.onnx"),
                                          calib, resnet_samples)):
        for n in counts:
            d = os.path.join(work, f"{label.split()[0]}_{n}")
            os.makedirs(d)
            np.save(os.path.join(d, "x.npy"), arrays[:n])
            cases.append((label, model, d, n))
    return cases


def runs(det_samples, resnet_samples, max_memory) -> None:
    work = tempfile.mkdtemp(prefix="bench-memory-")
    # The data is made in a child: Linux carries a process's RSS at fork into its children's peak (ru_maxrss
    # survives exec), so this parent must stay small.
    p = subprocess.run([sys.executable, "-m", "tools.bench.memory", "prepare", work, json.dumps(det_samples),
                        json.dumps(resnet_samples)], cwd=HERE, capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stderr)
    cases = json.loads(p.stdout.strip().splitlines()[-1])
    print("| model | samples | --max-memory | batch | estimated peak (MB) | peak RSS (MB) | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, model, d, n in cases:
        r = _measured_run(model, d, max_memory, d)
        mem = r["memory"] or {}
        est = f"{mem['estimated_peak'] / 2**20:,.0f}" if mem else "-"
        print(f"| {name} | {n} | {max_memory or 'default'} | {mem.get('batch', '-')} | {est} | {r['peak_mb']:,.0f} | "
              f"{r['seconds']:.0f} |" + ("" if r["exit"] == 0 else f" exit {r['exit']}: {r['stderr']}"), flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "prepare":
        print(json.dumps(prepare(sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]))))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "runs":
        ap = argparse.ArgumentParser(prog="python -m tools.bench.memory runs")
        ap.add_argument("--det-samples", default="16,32,64")
        ap.add_argument("--resnet-samples", default="64,256,512")
        ap.add_argument("--max-memory", default="6G")
        a = ap.parse_args(sys.argv[2:])
        ints = (lambda s: [int(v) for v in s.split(",") if v])  # noqa: E731
        runs(ints(a.det_samples), ints(a.resnet_samples), a.max_memory or None)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--build", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    d = args.build or tempfile.mkdtemp(prefix="bench-memory-")
    path = os.path.join(d, "big.onnx")
    if args.build:
        import numpy as np

        build(args.blocks, args.width, path)
        os.makedirs(os.path.join(d, "calib"))
        np.save(os.path.join(d, "calib", "x.npy"),
                np.random.default_rng(0).standard_normal((64, args.width)).astype(np.float32))
        return
    # Build in a child too: Linux keeps a process's peak RSS across exec, so this parent stays small.
    subprocess.run([sys.executable, "-m", "tools.bench.memory", "--blocks", str(args.blocks), "--width",
                    str(args.width), "--build", d], check=True, cwd=HERE)
    weights_mb = args.blocks * args.width * args.width * 4 / 2**20
    print(f"model: {args.blocks} residual blocks, {weights_mb:,.0f} MB of weights ({os.path.getsize(path) / 2**20:,.0f} MB file)")
    for share in (False, True):
        cfg = {"model": path, "calib": os.path.join(d, "calib"), "share": share}
        p = subprocess.run([sys.executable, "-m", "tools.bench.memory", "--child", json.dumps(cfg)],
                           capture_output=True, text=True, cwd=HERE)
        if p.returncode:
            sys.exit(p.stderr)
        r = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"shared weights {str(share):<5}: peak RSS {r['peak_rss_mb']:8,.0f} MB "
              f"({r['peak_rss_mb'] / weights_mb:.1f}x the weights; {r['rss_after_load_mb']:,.0f} MB after loading the model)")


if __name__ == "__main__":
    main()
