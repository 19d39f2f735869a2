"""Old vs new fidelity on the tiny synthetic detectors of the tests (issue 20, item 1): every block removed alone,
the output-tensor cosine the tool reported before (mean per-sample cosine of each output, averaged) against the
per-kind measure it reports now (detections kept), and the time the new measure takes.

    python -m tools.detector_fidelity [--samples 200]

Prints a markdown table (docs/BENCHMARKS.md, "Task-true fidelity").
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from onnx_consensus import find_blocks  # noqa: E402
from onnx_consensus.evaluate import compare  # noqa: E402
from onnx_consensus.graph.surgery import remove_blocks  # noqa: E402
from onnx_consensus.kinds import output_plan  # noqa: E402
from tests import detectors  # noqa: E402
from tests.helpers import run  # noqa: E402


def _outputs(model, x):
    return dict(zip([o.name for o in model.graph.output], run(model, {"images": x})))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200)
    args = ap.parse_args()
    x = detectors.images(args.samples, seed=1)
    print("| layout | block removed | old: output cosine (passes 0.99?) | new: detections kept "
          "| compare() time (both measures) |")
    print("|---|---|---:|---:|---:|")
    for layout in ("yolov8", "yolov5", "boxes"):
        model = detectors.build(layout)
        plan = output_plan(model)
        ref = _outputs(model, x)
        for b in find_blocks(model).blocks:
            out = _outputs(remove_blocks(model, [b]), x)
            old = compare([out], [ref], kinds={n: "generic" for n in ref})
            t0 = time.perf_counter()
            new = compare([out], [ref], kinds=plan)
            dt = time.perf_counter() - t0
            h = new.heads[0].details
            print(f"| {layout} | {b.id} | {old.cosine:.4f} ({'yes' if old.cosine >= 0.99 else 'no'}) | "
                  f"{h['detections_kept']:.2f} ({h['matched']} of {h['original_detections']}) | "
                  f"{dt * 1000:.0f} ms / {args.samples} samples |")


if __name__ == "__main__":
    main()
