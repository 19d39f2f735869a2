"""Quantized graphs pruned like their float models (issue 23): top-1 agreement, sizes, MACs.

    python -m tools.bench.quantized [--remove 2] [--max-samples 128] [--threads 2]

Quantizes the shipped models with onnxruntime.quantization (QDQ ResNet-56 by ``quantize_static`` on the first 32
shipped calibration images; ResNet-56 and the ViT by ``quantize_dynamic``), prunes each quantized model with the
default criterion (``prune --remove N`` on the first ``--max-samples`` calibration images, the API the CLI runs),
removes the same blocks from the float model, and prints one markdown row per model: the removed blocks, the top-1
agreement of the pruned quantized model with the quantized original and of the pruned float model with the float
original on the last 256 shipped calibration images (neither scored nor used by the quantizer), the agreement of
the two unpruned models, MACs, parameters and the weights' bytes as stored.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

MODELS = {  # name -> (float model, calibration folder, how it is quantized)
    "resnet56 QDQ (quantize_static)": ("models/resnet56_fmnist.onnx", "examples/fmnist_calib", "static"),
    "resnet56 dynamic (ConvInteger)": ("models/resnet56_fmnist.onnx", "examples/fmnist_calib", "dynamic"),
    "vit dynamic (MatMulInteger)": ("models/vit_fmnist.onnx", "examples/fmnist_vit_calib", "dynamic"),
}


def quantize(src: str, calib: str, how: str, out: str) -> str:
    """``src`` quantized by onnxruntime.quantization into ``out``."""
    import onnx
    from onnxruntime import quantization as q

    if how == "dynamic":
        q.quantize_dynamic(src, out)
        return out
    x = np.asarray(np.load(os.path.join(calib, "calib.npy"), mmap_mode="r")[:32], np.float32)
    name = onnx.load(src, load_external_data=False).graph.input[0].name

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.it = iter([{name: x[i:i + 16]} for i in range(0, 32, 16)])

        def get_next(self):
            return next(self.it, None)

    q.quantize_static(src, out, Reader(), quant_format=q.QuantFormat.QDQ)
    return out


def top1(model, x: np.ndarray, threads: int) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    m = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(m, so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 64]})[0].argmax(-1)
                           for i in range(0, len(x), 64)])


def row(name: str, remove: int, max_samples: int, threads: int, work: str) -> str:
    import onnx

    from onnx_consensus import count_cost, find_blocks, remove_blocks
    from onnx_consensus import DataOptions, Options, OutputOptions, RunOptions, TargetOptions, run

    src, calib, how = MODELS[name]
    qpath = quantize(src, calib, how, os.path.join(work, f"{how}_{os.path.basename(src)}"))
    options = Options(data=DataOptions(max_samples=max_samples), target=TargetOptions(remove=remove),
                      run=RunOptions(threads=threads), output=OutputOptions(latency=False))
    outcome = run(qpath, calib, options)
    removed = outcome.result.removed_ids
    fmodel = onnx.load(src)
    fpruned = remove_blocks(fmodel, [b for b in find_blocks(fmodel).blocks if b.id in removed])
    x = np.asarray(np.load(os.path.join(calib, "calib.npy"), mmap_mode="r")[-256:], np.float32)
    tq, tf = top1(qpath, x, threads), top1(src, x, threads)
    aq = (top1(outcome.model, x, threads) == tq).mean()
    af = (top1(fpruned, x, threads) == tf).mean()
    cq, cp, cf = count_cost(onnx.load(qpath)), count_cost(outcome.model), count_cost(fmodel)
    short = ", ".join(f"`{r}`" for r in removed)
    return (f"| {name} | {short} | {aq:.3f} | {af:.3f} | {(tq == tf).mean():.3f} | {cq.total_macs:,} -> "
            f"{cp.total_macs:,} | {cq.params:,} -> {cp.params:,} | {cq.weight_bytes:,} -> {cp.weight_bytes:,} "
            f"(float {cf.weight_bytes:,}) |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--remove", type=int, default=2)
    p.add_argument("--max-samples", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    print("| model | removed (default criterion) | top-1 agreement, pruned quantized vs quantized | pruned float vs "
          "float (same blocks) | quantized vs float, unpruned | MACs | parameters | weight bytes as stored |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as work:
        for name in MODELS:
            print(row(name, a.remove, a.max_samples, a.threads, work), flush=True)


if __name__ == "__main__":
    main()
