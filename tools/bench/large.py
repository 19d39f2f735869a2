"""Peak memory pruning a model with over 2 GB of external-data weights, against the model's size.

    python -m tools.bench.large [--blocks 34] [--width 4096] [--dir DIR]

Builds (streamed, so the build itself stays small) a residual MLP of ``blocks`` blocks x + Relu(x W_k),
W_k (width x width) float32 (64 MB each at width 4096: 34 blocks = 2.1 GiB), saved as big.onnx +
big.onnx.data, and 32 calibration samples; then runs

    onnx-cprune big.onnx out/pruned.onnx --calib calib --remove 2 --metrics cka --schedule one-shot -q --no-latency

in a child process and prints its peak RSS (ru_maxrss of the child), its wall time, the output's files and
the ratio of peak RSS to the weights' size. ``--build DIR`` only builds (used by the slow test).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(folder: str, blocks: int = 34, width: int = 4096) -> int:
    """Write big.onnx (+ big.onnx.data) and calib/x.npy into ``folder``; returns the weights' bytes."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    data_path = os.path.join(folder, "big.onnx.data")
    inits, nodes, x, offset = [], [], "x", 0

    def external(name: str, arr: np.ndarray, f) -> TensorProto:
        nonlocal offset
        raw = arr.astype(np.float32).tobytes()
        f.write(raw)
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=arr.shape,
                        data_location=TensorProto.EXTERNAL)
        for k, v in (("location", "big.onnx.data"), ("offset", str(offset)), ("length", str(len(raw)))):
            t.external_data.add(key=k, value=v)
        offset += len(raw)
        return t

    with open(data_path, "wb") as f:
        for k in range(blocks):
            w = rng.standard_normal((width, width), dtype=np.float32) * np.float32(0.3 / np.sqrt(width))
            inits.append(external(f"w{k}", w, f))
            nodes += [helper.make_node("MatMul", [x, f"w{k}"], [f"m{k}"]),
                      helper.make_node("Relu", [f"m{k}"], [f"r{k}"]),
                      helper.make_node("Add", [x, f"r{k}"], [f"h{k}"])]
            x = f"h{k}"
        inits.append(external("head", rng.standard_normal((width, 10), dtype=np.float32) * np.float32(0.01), f))
    nodes.append(helper.make_node("MatMul", [x, "head"], ["logits"]))
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), os.path.join(folder, "big.onnx"))
    os.makedirs(os.path.join(folder, "calib"), exist_ok=True)
    np.save(os.path.join(folder, "calib", "x.npy"), rng.standard_normal((32, width)).astype(np.float32))
    return offset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=34)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--dir", help="work here (default: a temporary directory, removed afterwards)")
    ap.add_argument("--build", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args.build:
        build(args.build, args.blocks, args.width)
        return
    d = args.dir or tempfile.mkdtemp(prefix="bench-large-")
    try:
        t0 = time.perf_counter()
        # build in a child: Linux keeps a process's peak RSS, and children's peaks are what we read below
        subprocess.run([sys.executable, "-m", "tools.bench.large", "--build", d, "--blocks", str(args.blocks),
                        "--width", str(args.width)], check=True, cwd=HERE)
        build_s = time.perf_counter() - t0
        build_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        weights = os.path.getsize(os.path.join(d, "big.onnx.data"))
        os.makedirs(os.path.join(d, "out"), exist_ok=True)
        cmd = [sys.executable, "-m", "onnx_consensus.cli", os.path.join(d, "big.onnx"),
               os.path.join(d, "out", "pruned.onnx"), "--calib", os.path.join(d, "calib"), "--remove", "2",
               "--metrics", "cka", "--schedule", "one-shot", "-q", "--no-latency"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode:
            sys.exit(p.stderr)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        outs = {f: os.path.getsize(os.path.join(d, "out", f)) for f in sorted(os.listdir(os.path.join(d, "out")))}
        res = {"blocks": args.blocks, "width": args.width, "weights_mb": weights / 2**20, "build_seconds": build_s,
               "build_peak_rss_mb": build_peak, "prune_seconds": wall, "prune_peak_rss_mb": peak,
               "peak_over_weights": peak / (weights / 2**20), "outputs": outs}
        print(f"model: {args.blocks} blocks of {args.width}x{args.width} float32, {weights / 2**20:,.0f} MB of "
              f"external weights (built in {build_s:.0f} s)")
        print(f"prune (2 blocks, cka, one-shot): {wall:.0f} s, peak RSS {peak:,.0f} MB "
              f"= {peak / (weights / 2**20):.2f}x the weights")
        print("output files: " + ", ".join(f"{f} ({s / 2**20:,.1f} MB)" for f, s in outs.items()))
        if build_peak >= peak:
            print(f"(note: the build child peaked at {build_peak:,.0f} MB, so the figure above is the build's)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
    finally:
        if not args.dir:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
