"""Remove each block alone and compare with the original (top-1 agreement, accuracy with labels).

    python -m tools.bench.single_block_impact [--model models/resnet56_fmnist.onnx] [--data examples/fmnist_calib]

The brute-force reference a criterion can be compared with: it costs one forward pass per block.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import onnx

from onnx_consensus import load_calibration
from onnx_consensus.evaluate import compare, reference_outputs
from onnx_consensus import find_blocks, remove_blocks

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(HERE, "models", "resnet56_fmnist.onnx"))
    ap.add_argument("--data", default=os.path.join(HERE, "examples", "fmnist_calib"))
    args = ap.parse_args()
    model = onnx.load(args.model)
    data = load_calibration(args.data, model)
    idx = np.arange(data.n_samples)
    ref = reference_outputs(model, data, idx)
    print(f"{'block':<45} {'agreement':>9} {'accuracy':>9}")
    for b in find_blocks(model).blocks:
        f = compare(reference_outputs(remove_blocks(model, [b]), data, idx), ref, data.labels)
        acc = f"{f.accuracy:.4f}" if f.accuracy is not None else "-"
        print(f"{b.id:<45} {f.agreement:>9.4f} {acc:>9}")


if __name__ == "__main__":
    main()
