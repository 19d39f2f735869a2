"""The public Python API: the same option groups as the CLI, importable from the package root."""
import numpy as np
import onnx

import onnx_consensus as oc
from tests.helpers import resnet_onnx


def test_public_api_end_to_end(tmp_path):
    model = resnet_onnx(20, "folded")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((30, 3, 32, 32)).astype(np.float32))
    data = oc.load_calibration(tmp_path, model)
    assert data.n_samples == 30
    report = oc.find_blocks(model)
    assert len(report.blocks) == 7
    rnd = oc.score_blocks(model, data, metrics=("cka", "linear_1"), batch_size=16)
    assert set(rnd.order) == {b.id for b in report.blocks}
    outcome = oc.prune(model, data, criterion=oc.CriterionOptions(metrics=("cka",), schedule="one-shot"),
                       target=oc.TargetOptions(remove=2, keep_per_stage=0), run=oc.RunOptions(batch_size=16),
                       output=oc.OutputOptions(latency=False))
    result = outcome.result
    assert outcome.model is result.model and outcome.exit_code == 0 and outcome.write
    assert result.removed_ids == result.rounds[0].order[:2]
    assert result.score_samples + result.holdout_samples == 30
    assert oc.count_cost(result.model).total_macs == oc.count_cost(model).total_macs - 2 * 4_718_592
    onnx.checker.check_model(result.model, full_check=True)
    assert sorted(oc.__all__) == oc.__all__ and "prune" in oc.__all__
