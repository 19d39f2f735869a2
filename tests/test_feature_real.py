"""Issue 12, failure 5 and 7(a) on real models (marker `real`): MiniLM (a post-LN sentence embedder, no head)
and PP-OCRv4's text detector (a one-channel score map). The models and calibration folders are the corpus's
(`python -m tools.data.real_models fetch/calib NAME`, in .cache/real-models/NAME/); skipped when absent.

Measured (2 shared cores; docs in the report of this change): on MiniLM `--remove 2` removed the last
layer's two sub-blocks before (the feature was inside the last MLP; embedding cosine 0.43 on 64 eval
sentences), and now removes two middle sub-blocks (cosine 0.92).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_consensus.cli import main
from onnx_consensus.data import load_calibration
from onnx_consensus.graph.ir import interface
from onnx_consensus.runtime import make_session

pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parent.parent / ".cache" / "real-models"


def corpus(name: str) -> tuple[Path, Path, Path]:
    d = ROOT / name
    if not (d / "model.onnx").exists() or not (d / "calib").is_dir():
        pytest.skip(f"{name} not in .cache/real-models (python -m tools.data.real_models fetch {name}; calib {name})")
    return d / "model.onnx", d / "calib", d / "eval"


def _embedding_cosine(model: onnx.ModelProto, pruned: onnx.ModelProto, data_dir: Path, n: int = 64) -> float:
    data = load_calibration(str(data_dir), model, max_samples=n)
    cos = []
    for feeds in data.batches(16):
        a = make_session(model, level="all", threads=1).run(None, feeds)[0]
        b = make_session(pruned, level="all", threads=1).run(None, feeds)[0]
        a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
        cos.append(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    return float(np.concatenate(cos).mean())


def _prune(tmp_path, model: Path, calib: Path, *extra: str, capsys) -> tuple[int, str, dict, Path]:
    out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(["prune", str(model), str(out), "--calib", str(calib), "--threads", "1", "-q", "--no-latency",
                 "--report", str(rep), *extra])
    text = capsys.readouterr().out
    return code, text, json.loads(rep.read_text()), out


def test_minilm_inspect_names_the_embedding(capsys):
    model, _, _ = corpus("minilm")
    assert main(["inspect", str(model)]) == 0
    out = capsys.readouterr().out
    assert "Feature tensor (global scope): sentence_embedding (graph output; no classifier head" in out
    assert "Outputs: sentence_embedding (embedding)" in out


def test_minilm_remove2_keeps_the_last_layer(tmp_path, capsys):
    model, calib, eval_dir = corpus("minilm")
    code, text, report, out = _prune(tmp_path, model, calib, "--remove", "2", capsys=capsys)
    assert code == 0, text
    assert report["feature"]["tensor"] == "sentence_embedding"
    assert not any(i.startswith("/layers.5/") for i in report["removed_ids"]), report["removed_ids"]
    assert "embedding cosine" in text and "top-1 agreement" not in text
    assert report["fidelity"]["agreement"] is None and report["fidelity"]["cosine"] > 0.85
    # the last MLP sub-block is no longer scored ~0 (it was 4e-16 on CKA with the old feature)
    first = {b["id"]: b["scores"] for b in report["rounds"][0]["blocks"]}
    assert first["/layers.5/ln2/LayerNormalization_output_0"]["cka"] > 1e-3
    written = onnx.load(out)
    onnx.checker.check_model(written, full_check=True)
    assert interface(written) == interface(onnx.load(model))
    assert _embedding_cosine(onnx.load(model), written, eval_dir) > 0.85  # 0.43 before (the last layer removed)


def test_ppocr_det_feature_is_the_score_map(tmp_path, capsys):
    model, calib, _ = corpus("ppocr_det")
    code, text, report, out = _prune(tmp_path, model, calib, "--remove", "2", "--max-samples", "32", capsys=capsys)
    assert code == 0, text
    assert report["feature"]["tensor"] == "sigmoid_0.tmp_0"
    # since issue 20 the DB probability map is a text map, judged by mask IoU at 0.3 (was an output cosine)
    assert "text-map IoU" in text and "top-1 agreement" not in text
    assert report["fidelity"]["agreement"] is None and report["fidelity"]["outputs"][0]["kind"] == "text map"
    onnx.checker.check_model(onnx.load(out), full_check=True)
