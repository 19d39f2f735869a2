"""One pipeline: the same job through the Python API and the command gives the same removals, MACs and
written model (bfloat16 included); failures midway come back as PruneFailed / a partial Outcome."""
import json

import numpy as np
import onnx
import pytest

import onnx_consensus as oc
from onnx_consensus import pipeline
from onnx_consensus.cli import main
from onnx_consensus.errors import PruneFailed, TargetError
from tests.helpers import residual_mlp, run


def _same_job(tmp_path, model, x, name):
    """Prune ``model`` (saved as a file) with calibration ``x`` through the CLI and through the API;
    returns (CLI report, CLI model, API outcome, API-written model)."""
    src, calib = tmp_path / f"{name}.onnx", tmp_path / f"{name}_calib"
    onnx.save(model, src)
    calib.mkdir()
    np.save(calib / "x.npy", x)
    cli_out, cli_rep = tmp_path / f"{name}_cli.onnx", tmp_path / f"{name}_cli.json"
    assert main([str(src), str(cli_out), "--calib", str(calib), "--remove", "2", "--metrics", "cka,linear_1",
                 "-q", "--no-latency", "--batch-size", "16", "--report", str(cli_rep)]) == 0
    data = oc.load_calibration(calib, model)  # loaded for the model as it is (bfloat16 inputs for bfloat16)
    outcome = oc.prune(model, data, criterion=oc.CriterionOptions(metrics=("cka", "linear_1")),
                       target=oc.TargetOptions(remove=2), run=oc.RunOptions(batch_size=16),
                       output=oc.OutputOptions(latency=False))
    api_out = tmp_path / f"{name}_api.onnx"
    assert pipeline.write(outcome, api_out).model == str(api_out)
    return json.loads(cli_rep.read_text()), onnx.load(cli_out), outcome, onnx.load(api_out)


def _check_same(report, cli_model, outcome, api_model, feed):
    assert outcome.exit_code == 0 and outcome.status == "done" and outcome.failure is None
    assert outcome.removed_ids == report["removed_ids"] and len(report["removed_ids"]) == 2
    assert outcome.report["macs"] == report["macs"] and outcome.report["params"] == report["params"]
    assert outcome.report["fidelity"] == report["fidelity"]
    assert [n.output[0] for n in api_model.graph.node] == [n.output[0] for n in cli_model.graph.node]
    for a, b in zip(run(api_model, feed), run(cli_model, feed)):
        np.testing.assert_array_equal(a, b)


def test_api_and_cli_same_outcome_float32(tmp_path):
    model = residual_mlp(6, 16)
    x = np.random.default_rng(0).standard_normal((60, 16)).astype(np.float32)
    report, cli_model, outcome, api_model = _same_job(tmp_path, model, x, "f32")
    _check_same(report, cli_model, outcome, api_model, {"x": x[:8]})
    assert run(api_model, {"x": x[:8]})[0].shape == (8, 10)


def test_api_and_cli_same_outcome_bfloat16(tmp_path):
    """`prune()` on a bfloat16 model used to fail (TypeError: Cannot interpret '16' as a data type): it now
    runs the command's float32 shadow and writes the same bfloat16 model."""
    import ml_dtypes

    from onnx_consensus.graph.precision import float32_shadow

    model = residual_mlp(6, 16, dtype=ml_dtypes.bfloat16)
    x = np.random.default_rng(0).standard_normal((60, 16)).astype(np.float32)
    report, cli_model, outcome, api_model = _same_job(tmp_path, model, x, "bf16")
    assert outcome.warnings and "bfloat16" in outcome.warnings[0]
    assert all(t.data_type == onnx.TensorProto.BFLOAT16 for t in api_model.graph.initializer)
    assert oc.count_cost(api_model).params == report["params"]["after"]
    _check_same(report, float32_shadow(cli_model), outcome, float32_shadow(api_model), {"x": x[:8]})
    # the written bfloat16 model, computed in float32, is the float32 model with the same removals
    by_id = oc.find_blocks(float32_shadow(model)).by_id()
    plain = oc.remove_blocks(float32_shadow(model), [by_id[i] for i in outcome.removed_ids])
    np.testing.assert_array_equal(run(float32_shadow(api_model), {"x": x[:8]})[0], run(plain, {"x": x[:8]})[0])


def _fail_on_round(monkeypatch, n: int, exc: BaseException):
    import onnx_consensus.pruner as pruner_mod

    real, calls = pruner_mod.score_blocks, [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise exc
        return real(*args, **kwargs)
    monkeypatch.setattr(pruner_mod, "score_blocks", flaky)


@pytest.fixture
def mlp_data(tmp_path):
    model = residual_mlp(6, 16)
    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32))
    return model, oc.load_calibration(tmp_path, model)


@pytest.mark.parametrize("exc, code", [(RuntimeError("injected"), 1), (KeyboardInterrupt(), 130)])
def test_failure_midway_partial_result(monkeypatch, mlp_data, exc, code):
    from onnx_consensus.pruner import prune as schedule

    model, data = mlp_data
    target, crit = oc.TargetOptions(remove=3), oc.CriterionOptions(metrics=("cka",))
    _fail_on_round(monkeypatch, 3, exc)
    with pytest.raises(PruneFailed) as info:
        schedule(model, data, criterion=crit, target=target)
    failed = info.value
    assert failed.__cause__ is exc and failed.exit_code == code
    assert len(failed.partial.removals) == 2 and len(failed.partial.rounds) == 2
    assert not hasattr(exc, "partial_result")

    # the pipeline raises the failure itself, or with keep_partial returns the partial outcome
    _fail_on_round(monkeypatch, 3, exc)
    with pytest.raises(type(exc)):
        oc.prune(model, data, criterion=crit, target=target, output=oc.OutputOptions(latency=False))
    _fail_on_round(monkeypatch, 3, exc)
    outcome = oc.prune(model, data, criterion=crit, target=target,
                       output=oc.OutputOptions(latency=False, keep_partial=True))
    assert outcome.status == "partial" and outcome.exit_code == code and outcome.write
    assert outcome.failure.__cause__ is exc and outcome.report["partial"] is True
    assert outcome.removed_ids == failed.partial.removed_ids
    assert len(outcome.model.graph.node) == len(model.graph.node) - 2 * 3


def test_unmet_target_is_not_a_partial_result(mlp_data):
    model, data = mlp_data
    with pytest.raises(TargetError, match="cannot be met"):
        oc.prune(model, data, criterion=oc.CriterionOptions(metrics=("cka",), schedule="one-shot"),
                 target=oc.TargetOptions(remove=6), output=oc.OutputOptions(latency=False, keep_partial=True))


def test_evaluator_object(mlp_data):
    from onnx_consensus.finetune.evaluator import Evaluator

    model, data = mlp_data
    ev = Evaluator(model, data, batch_size=16)
    assert ev.original_metric == 1.0 and ev(model) == 1.0  # agreement of the model with itself
    by_id = oc.find_blocks(model).by_id()
    pruned = oc.remove_blocks(model, list(by_id.values())[-3:])
    y, y0 = run(pruned, {"x": np.load(data.files[0])})[0], run(model, {"x": np.load(data.files[0])})[0]
    assert ev(pruned) == pytest.approx(np.mean(y.argmax(1) == y0.argmax(1)))


def test_finetune_batch_size_builds_the_training_batches(monkeypatch, mlp_data):
    """FinetuneConfig.batch_size is the training batch size (it was documented as informative only)."""
    pytest.importorskip("torch")
    import onnx_consensus.finetune.train as train
    from onnx_consensus.finetune.job import finetune_pruned

    model, data = mlp_data
    seen = []

    def record(student, train_batches, *, teacher, config, eval_fn, progress, **kw):
        seen.extend(len(labels if labels is not None else next(iter(feeds.values())))
                    for feeds, labels in train_batches())
        return student, train.FinetuneResult()
    monkeypatch.setattr(train, "finetune", record)
    finetune_pruned(model, model, data, config=oc.FinetuneConfig(batch_size=7), progress=False)
    assert seen == [7] * 5 + [5]  # 40 samples
