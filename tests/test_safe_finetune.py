"""Safe fine-tuning (issue 12, failure 9): the written model is the best of {pruned, each epoch}; BN running
statistics frozen on small training data; the fidelity printed after fine-tuning is the written model's."""
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_consensus.cli import main
from onnx_consensus.graph.blocks import find_blocks
from onnx_consensus.graph.surgery import remove_blocks
from tests.helpers import resnet_onnx, residual_mlp, run

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bn_setup(tmp_path_factory):
    """A ResNet-20 with BatchNormalization nodes; an evaluation set of 48 standard-normal images; a tiny
    skewed training set (8 images, mean 2, std 3) whose batch statistics are far from the stored ones."""
    d = tmp_path_factory.mktemp("safeft")
    src = d / "r20bn.onnx"
    onnx.save(resnet_onnx(20, "bn"), src)
    rng = np.random.default_rng(1)
    ev, skew = d / "eval", d / "skew"
    ev.mkdir()
    skew.mkdir()
    np.save(ev / "x.npy", rng.standard_normal((48, 3, 32, 32)).astype(np.float32))
    np.save(skew / "x.npy", (2.0 + 3.0 * rng.standard_normal((8, 3, 32, 32))).astype(np.float32))
    return src, ev, skew


def _plain_pruned(src, report) -> onnx.ModelProto:
    original = onnx.load(src)
    by_id = find_blocks(original).by_id()
    return remove_blocks(original, [by_id[i] for i in report["removed_ids"]])


def _agreement(model, reference, x) -> float:
    return float(np.mean(run(model, {"input": x})[0].argmax(1) == run(reference, {"input": x})[0].argmax(1)))


def _fidelity(model, reference, x) -> float:
    """The evaluator's measure (issue 20): top-1 agreement, or when every original prediction is one class
    (agreement is then nearly blind) the lower of it and exp(-KL) of the class scores."""
    o, r = run(model, {"input": x})[0].astype(np.float64), run(reference, {"input": x})[0].astype(np.float64)
    agree = _agreement(model, reference, x)
    if len(set(r.argmax(1).tolist())) > 1:
        return agree
    lp = r - r.max(1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    lq = o - o.max(1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(1, keepdims=True))
    return min(agree, float(np.exp(-np.mean((np.exp(lp) * (lp - lq)).sum(1)))))


def _bn_stats(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {name: inits[name] for n in model.graph.node if n.op_type == "BatchNormalization"
            for name in n.input[3:5]}


def test_damaging_finetune_is_not_written(tmp_path, bn_setup, capsys):
    """Re-estimating BN statistics on 8 skewed images ruins the model even at lr 1e-12: the pruned model is
    written (exit 0) and the summary says so; the pruned model's eval metric is measured as epoch 0."""
    src, ev, skew = bn_setup
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code = main([str(src), str(out), "--calib", str(ev), "--remove", "2", "--metrics", "cka", "-q", "--no-latency",
                 "--finetune-epochs", "1", "--train", str(skew), "--eval", str(ev), "--bn-stats", "update",
                 "--lr", "1e-12", "--report", str(rep)])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads(rep.read_text())
    ft = report["finetune"]
    assert ft["bn_stats"] == "updated" and ft["bn_stats_reason"] == "--bn-stats update"
    assert ft["best_finetuned"] < ft["metric_before"] - 0.1  # the fine-tuned epoch really is damaged
    assert ft["best_epoch"] == 0 and ft["kept"] == "pruned" and ft["metric_after"] == ft["metric_before"]
    assert "fine-tuning did not improve" in printed.lower() and "the pruned model was written" in printed
    # the written model is the pruned one: same outputs as plain surgery on the original, and the metric
    # reported as "before" is its fidelity to the original on the eval data (onnxruntime; its random weights
    # predict one class everywhere, so exp(-KL) is read with the agreement)
    x = np.load(ev / "x.npy")
    written, plain = onnx.load(out), _plain_pruned(src, report)
    np.testing.assert_allclose(run(written, {"input": x})[0], run(plain, {"input": x})[0], rtol=0, atol=1e-5)
    assert ft["metric_before"] == pytest.approx(_fidelity(plain, onnx.load(src), x), abs=1e-9)
    assert _bn_stats(written).keys() == _bn_stats(plain).keys()
    for name, value in _bn_stats(plain).items():
        assert np.array_equal(_bn_stats(written)[name], value), name


def test_default_freezes_bn_on_small_data(tmp_path, bn_setup, capsys):
    """The same run without --bn-stats: 8 training samples < 1000, statistics frozen, no damage; the
    written model's BN running statistics are the input's initializers, bit for bit."""
    src, ev, skew = bn_setup
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main([str(src), str(out), "--calib", str(ev), "--remove", "2", "--metrics", "cka", "-q", "--no-latency",
                 "--finetune-epochs", "1", "--train", str(skew), "--eval", str(ev), "--lr", "1e-12",
                 "--report", str(rep), "--force-write"]) == 0
    ft = json.loads(rep.read_text())["finetune"]
    assert ft["bn_stats"] == "frozen" and ft["bn_stats_reason"] == "8 training samples < 1000"
    assert ft["best_finetuned"] == pytest.approx(ft["metric_before"], abs=1e-9)
    assert "statistics frozen during fine-tuning (8 training samples < 1000" in capsys.readouterr().out
    stats = _bn_stats(onnx.load(out))
    original = _bn_stats(onnx.load(src))
    assert stats and all(np.array_equal(v, original[k]) for k, v in stats.items())


def test_frozen_bn_stats_in_the_bridge_affine_still_trained(bn_setup):
    """Bridge level: with few samples BN running statistics are written back unchanged (compared with the
    ONNX initializers) while BN scale/shift and conv weights train; ``bn_stats="update"`` changes them."""
    from onnx_consensus.finetune.train import finetune
    from onnx_consensus.options import FinetuneConfig

    src, ev, _ = bn_setup
    teacher = onnx.load(src)
    model = remove_blocks(teacher, find_blocks(teacher).blocks[:2])  # a student that differs from its teacher
    x = np.load(ev / "x.npy")[:32]

    def batches():
        return [({"input": x[i:i + 16]}, None) for i in range(0, 32, 16)]

    def scales(m):
        inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        return {n.input[1]: inits[n.input[1]] for n in m.graph.node if n.op_type == "BatchNormalization"}

    before_stats, before_scales = _bn_stats(model), scales(model)
    for mode, frozen in ((None, True), ("update", False)):
        cfg = FinetuneConfig(epochs=1, lr=0.05, bn_stats=mode, batch_size=16)
        tuned, res = finetune(model, batches, teacher=teacher, config=cfg, progress=False)
        assert res.bn_stats == ("frozen" if frozen else "updated")
        after = _bn_stats(tuned)
        same = [np.array_equal(after[k], v) for k, v in before_stats.items()]
        assert all(same) if frozen else not any(same)
        assert any(not np.array_equal(scales(tuned)[k], v) for k, v in before_scales.items())


def test_fidelity_after_finetune_is_the_written_models(tmp_path, capsys):
    """No --eval: the epoch is chosen on the hold-out (left out of training); the summary and report
    fidelity equal an independent onnxruntime evaluation of the written file on the hold-out samples."""
    src, calib = tmp_path / "mlp.onnx", tmp_path / "calib"
    onnx.save(residual_mlp(6, 16), src)
    calib.mkdir()
    np.save(calib / "x.npy", np.random.default_rng(1).standard_normal((200, 16)).astype(np.float32))
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main([str(src), str(out), "--calib", str(calib), "--remove", "3", "--metrics", "cka", "-q",
                 "--no-latency", "--finetune-epochs", "3", "--ft-batch-size", "16", "--lr", "0.05",
                 "--report", str(rep)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(rep.read_text())
    ft, fid = report["finetune"], report["fidelity"]
    assert ft["eval"] == "hold-out" and ft["train_samples"] == 160 and ft["eval_samples"] == 40
    assert ft["best_epoch"] > 0 and ft["kept"] == "fine-tuned" and ft["bn_stats"] is None
    # the hold-out of the pruner's split, recomputed here: 40 of 200 samples, seed 0
    hold = np.sort(np.random.default_rng(0).permutation(200)[:40])
    x = np.load(calib / "x.npy")[hold]
    y, y0 = run(onnx.load(out), {"x": x})[0], run(onnx.load(src), {"x": x})[0]
    agreement = float(np.mean(y.argmax(1) == y0.argmax(1)))
    rel = float(np.mean(np.linalg.norm(y - y0, axis=1) / np.linalg.norm(y0, axis=1)))
    assert fid["n"] == 40
    assert fid["agreement"] == pytest.approx(agreement, abs=1e-6)
    assert fid["rel_error"] == pytest.approx(rel, rel=1e-4)
    assert ft["metric_after"] == pytest.approx(agreement, abs=1e-6)
    pruned = ft["holdout_fidelity_pruned"]  # the value printed before this fix
    assert fid["agreement"] > pruned["agreement"] and fid["rel_error"] < pruned["rel_error"]
    assert f"Fidelity of the fine-tuned model on 40 hold-out samples: top-1 agreement {agreement:.4f}" in printed
    meta = json.loads(next(p.value for p in onnx.load(out).metadata_props if p.key == "onnx_consensus.report"))
    assert meta["fidelity"] == fid  # the provenance stamped in the file says the same
