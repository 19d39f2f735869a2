"""`--metrics paper` reproduces the published Consensus as this code computed it before the criterion
changes: the orders of every round and the removals on the shipped ResNet-56 (captured by running the code
of commit 7d35026, the default `--metrics` then, on the first 160 calibration images)."""
import json
import os

import onnx
import pytest

from onnx_consensus import CriterionOptions, OutputOptions, RunOptions, TargetOptions, load_calibration, prune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_paper_preset_reproduces_the_published_order():
    with open(os.path.join(ROOT, "tests", "data", "paper_order_resnet56.json")) as f:
        want = json.load(f)
    model = onnx.load(os.path.join(ROOT, "models", "resnet56_fmnist.onnx"))
    data = load_calibration(os.path.join(ROOT, "examples", "fmnist_calib"), model, max_samples=want["max_samples"])
    out = prune(model, data, criterion=CriterionOptions(metrics=("paper",)),
                target=TargetOptions(remove=want["remove"]), run=RunOptions(threads=1, progress=False),
                output=OutputOptions(latency=False))
    assert out.result.removed_ids == want["removed"]
    assert [r.order for r in out.result.rounds] == want["round_orders"]
