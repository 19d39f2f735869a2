"""Peak memory of a global-scope scoring round on a large model, with and without shared weights.

    python -m tools.bench_memory [--blocks 16] [--width 4096]

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

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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

    from onnx_consensus.data import load_calibration
    from onnx_consensus.graph.blocks import find_blocks
    from onnx_consensus.scoring import collect_features

    model = onnx.load(cfg["model"])
    data = load_calibration(cfg["calib"], model)
    blocks = find_blocks(model, macs_per_node={}).blocks
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    collect_features(model, data, blocks, batch_size=32, threads=2, share_weights=cfg["share"])
    return {"share": cfg["share"], "blocks": len(blocks), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_load_mb": rss_model}


def main() -> None:
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
    subprocess.run([sys.executable, "-m", "tools.bench_memory", "--blocks", str(args.blocks), "--width",
                    str(args.width), "--build", d], check=True, cwd=HERE)
    weights_mb = args.blocks * args.width * args.width * 4 / 2**20
    print(f"model: {args.blocks} residual blocks, {weights_mb:,.0f} MB of weights ({os.path.getsize(path) / 2**20:,.0f} MB file)")
    for share in (False, True):
        cfg = {"model": path, "calib": os.path.join(d, "calib"), "share": share}
        p = subprocess.run([sys.executable, "-m", "tools.bench_memory", "--child", json.dumps(cfg)],
                           capture_output=True, text=True, cwd=HERE)
        if p.returncode:
            sys.exit(p.stderr)
        r = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"shared weights {str(share):<5}: peak RSS {r['peak_rss_mb']:8,.0f} MB "
              f"({r['peak_rss_mb'] / weights_mb:.1f}x the weights; {r['rss_after_load_mb']:,.0f} MB after loading the model)")


if __name__ == "__main__":
    main()
