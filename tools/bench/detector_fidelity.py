"""Old vs new fidelity on the tiny synthetic detectors of the tests (issue 20, item 1): every block removed alone,
the output-tensor cosine the tool reported before (mean per-sample cosine of each output, averaged) against the
per-kind measure it reports now (detections kept), and the time the new measure takes.

    python -m tools.bench.detector_fidelity [--samples 200] [--distill]

Prints a markdown table (docs/BENCHMARKS.md, "Task-true fidelity"). ``--distill`` also removes the evidence
block of the YOLOv8 one and distils it for 8 epochs (AdamW, lr 0.01, batch 32, on 160 of the 200 images, the
best epoch on the other 40 by detections kept) with each distillation loss: the detection loss (BCE on the
scores + per-channel standardised boxes), the per-channel standardised MSE, and the loss used before issue 20
(one variance for the whole tensor, ``relative_mse``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from onnx_consensus import find_blocks  # noqa: E402
from onnx_consensus.evaluate import compare  # noqa: E402
from onnx_consensus import remove_blocks  # noqa: E402
from onnx_consensus.kinds import output_plan  # noqa: E402
from tests import detectors  # noqa: E402
from tests.helpers import run  # noqa: E402


def _outputs(model, x):
    return dict(zip([o.name for o in model.graph.output], run(model, {"images": x})))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--distill", action="store_true", help="also compare the distillation losses")
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
    if args.distill:
        distill(args.samples)


def distill(samples: int) -> None:
    import importlib
    import tempfile

    from onnx_consensus import FinetuneConfig, TargetOptions, prune
    from onnx_consensus.bridge import losses

    ft = importlib.import_module("onnx_consensus.finetune.train")
    folder = tempfile.mkdtemp()
    np.save(os.path.join(folder, "x.npy"), detectors.images(samples, seed=3))
    model = detectors.build("yolov8")
    bad = detectors.evidence_block(model)
    print("\n| distillation loss | detections kept: pruned -> best epoch | per epoch |")
    print("|---|---:|---|")
    original_plan = ft.plan
    for name in ("detection", "channel_mse", "relative_mse"):
        spec = losses.OutputLoss("output0", "yolov8", name, axis=1 if name == "channel_mse" else None)
        ft.plan = lambda teacher, outputs=None, spec=spec, **kw: [spec]
        try:
            out = prune(model, folder, target=TargetOptions(remove=1, only=(bad,)),
                        finetune=FinetuneConfig(epochs=8, lr=0.01, optimizer="adamw", batch_size=32))
        finally:
            ft.plan = original_plan
        info = out.report["finetune"]
        per = ", ".join(f"{h['metric']:.2f}" for h in info["history"])
        print(f"| {name} | {info['metric_before']:.2f} -> {info['metric_after']:.2f} | {per} |")


if __name__ == "__main__":
    main()
