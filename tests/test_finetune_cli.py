"""Fine-tuning from the CLI: supervised and distillation runs, and a failure that keeps the pruned model."""
import json

import numpy as np
import onnx
import pytest

from onnx_consensus.cli import main
from onnx_consensus.errors import FinetuneError
from onnx_consensus.graph.blocks import find_blocks
from onnx_consensus.graph.surgery import remove_blocks
from onnx_consensus.options import PAPER_METRICS
from tests.helpers import resnet_onnx, run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    src = d / "r20bn.onnx"
    model = resnet_onnx(20, "bn")
    onnx.save(model, src)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 3, 32, 32)).astype(np.float32)
    labelled, unlabelled = d / "lab", d / "unlab"
    labelled.mkdir()
    unlabelled.mkdir()
    np.save(labelled / "x.npy", x)
    np.save(unlabelled / "x.npy", x)
    np.save(labelled / "labels.npy", run(model, {"input": x})[0].argmax(1))  # the model's own classes
    return src, labelled, unlabelled


@pytest.mark.parametrize("kind", ["lab", "unlab"])
def test_finetune_modes(tmp_path, setup, kind):
    src, labelled, unlabelled = setup
    calib = labelled if kind == "lab" else unlabelled
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    criterion = ["--metrics", "cka"] if kind == "lab" else []  # unlab: the default with fine-tuning
    code = main([str(src), str(out), "--calib", str(calib), "--remove", "2", *criterion, "-q",
                 "--no-latency", "--finetune-epochs", "1", "--ft-batch-size", "16", "--eval", str(labelled),
                 "--report", str(rep)])
    assert code == 0
    report = json.loads(rep.read_text())
    if kind == "lab":
        assert report["criterion"] == {"metrics": ["cka"], "default": None}
        assert set(report["rounds"][0]["blocks"][0]["ranks"]) == {"cka"}
    else:  # --finetune-epochs without --metrics: paper+output, the eight and output_kl in one rank sum
        assert report["criterion"] == {"metrics": ["paper+output"], "default": "with fine-tuning"}
        assert report["options"]["metrics"] == ["paper+output"]
        assert set(report["rounds"][0]["blocks"][0]["ranks"]) == set(PAPER_METRICS) | {"output_kl"}
    ft = report["finetune"]
    assert ft["mode"] == ("supervised" if kind == "lab" else "distillation")
    assert ft["metric"] == "accuracy"
    assert ft["metric_original"] == 1.0  # labels are the original model's own predictions
    assert ft["images_seen"] == 38 and len(ft["history"]) == 1  # 48 minus the 10 hold-out samples
    # before / after against onnxruntime: plain surgery of the removed blocks, and the written model
    x, labels = np.load(labelled / "x.npy"), np.load(labelled / "labels.npy")
    original = onnx.load(src)
    by_id = find_blocks(original).by_id()
    plain = remove_blocks(original, [by_id[i] for i in json.loads(rep.read_text())["removed_ids"]])
    assert ft["metric_before"] == pytest.approx(np.mean(run(plain, {"input": x})[0].argmax(1) == labels), abs=1e-6)
    pruned = onnx.load(out)
    assert ft["metric_after"] == pytest.approx(np.mean(run(pruned, {"input": x})[0].argmax(1) == labels), abs=1e-6)
    onnx.checker.check_model(pruned, full_check=True)
    meta = {p.key for p in pruned.metadata_props}
    assert "onnx_consensus.report" in meta


def test_finetune_failure_keeps_pruned_model_exit_4(tmp_path, setup, monkeypatch, capsys):
    import onnx_consensus.finetune.train as train

    def boom(*a, **k):
        raise FinetuneError("fine-tuning failed: RuntimeError: simulated")
    monkeypatch.setattr(train, "finetune", boom)
    src, labelled, _ = setup
    out = tmp_path / "o.onnx"
    code = main([str(src), str(out), "--calib", str(labelled), "--remove", "1", "--metrics", "cka", "-q",
                 "--no-latency", "--finetune-epochs", "1"])
    assert code == 4
    assert out.exists()
    onnx.checker.check_model(onnx.load(out), full_check=True)
    err = capsys.readouterr().err
    assert "simulated" in err and "not fine-tuned" in err


def test_finetune_between_removals(tmp_path, setup):
    src, labelled, _ = setup
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main([str(src), str(out), "--calib", str(labelled), "--remove", "3", "-q",
                 "--no-latency", "--finetune-between", "2", "--report", str(rep)]) == 0
    report = json.loads(rep.read_text())
    # fine-tuning between removals counts as fine-tuning: the default criterion is paper+output
    assert report["criterion"] == {"metrics": ["paper+output"], "default": "with fine-tuning"}
    assert len(report["removed_ids"]) == 3 and len(report["rounds"]) == 3
    # weights changed between removals: the pruned model differs from plain surgery on the original
    original = onnx.load(src)
    by_id = find_blocks(original).by_id()
    plain = remove_blocks(original, [by_id[i] for i in report["removed_ids"]])
    x = np.load(labelled / "x.npy")[:4]
    assert not np.allclose(run(onnx.load(out), {"input": x})[0], run(plain, {"input": x})[0])


def test_finetune_without_torch_says_how_to_get_it(tmp_path, setup, monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    src, labelled, _ = setup
    out = tmp_path / "o.onnx"
    assert main([str(src), str(out), "--calib", str(labelled), "--remove", "1", "-q", "--finetune-epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install torch==2.13.0" in err and "\n" not in err and not out.exists()
