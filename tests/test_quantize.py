"""--quantize: the shipped models quantized keep their interface, run, shrink, and stay close to the original
(onnxruntime outputs of the float model as the reference); the four-row table is measured in the run."""
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_consensus.data import load_calibration
from onnx_consensus.errors import InputError
from onnx_consensus.graph.ir import interface
from onnx_consensus.quantize import FORMATS, quantize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESNET = os.path.join(ROOT, "models", "resnet56_fmnist.onnx")
VIT = os.path.join(ROOT, "models", "vit_fmnist.onnx")
RESNET_CALIB = os.path.join(ROOT, "examples", "fmnist_calib")
VIT_CALIB = os.path.join(ROOT, "examples", "fmnist_vit_calib")


def _outputs(model, feed):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


@pytest.fixture(scope="module")
def vit():
    model = onnx.load(VIT)
    return model, load_calibration(VIT_CALIB, model, max_samples=48)


def _agreement(model, quantized, data, idx):
    feed = next(data.batches(len(idx), idx))
    ref, out = _outputs(model, feed), _outputs(quantized, feed)
    return float(np.mean(ref.argmax(1) == out.argmax(1))), ref, out


def test_formats_registered():
    assert set(FORMATS) >= {"int8", "int4", "fp16"}


def test_int8_resnet_keeps_interface_shrinks_and_agrees():
    model = onnx.load(RESNET)
    data = load_calibration(RESNET_CALIB, model, max_samples=64)
    q = quantize(model, "int8", data, np.arange(32))
    assert interface(q) == interface(model)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in q.graph.node}
    assert q.ByteSize() < model.ByteSize() / 3  # int8 weights: about a quarter of float32
    onnx.checker.check_model(q, full_check=True)
    agree, _, _ = _agreement(model, q, data, np.arange(32, 64))  # samples the calibration never saw
    assert agree >= 0.9


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp16"])
def test_vit_formats(vit, fmt):
    model, data = vit
    q = quantize(model, fmt, data, np.arange(24))
    assert interface(q) == interface(model)
    assert q.ByteSize() < model.ByteSize() * (0.6 if fmt == "fp16" else 0.5)
    ops = {n.op_type for n in q.graph.node}
    assert {"int8": "QuantizeLinear", "int4": "MatMulNBits", "fp16": "Cast"}[fmt] in ops
    if fmt != "int4":  # MatMulNBits is an onnxruntime operator, not onnx's
        onnx.checker.check_model(q, full_check=True)
    agree, ref, out = _agreement(model, q, data, np.arange(24, 48))
    assert out.dtype == np.float32
    assert agree >= 0.85
    if fmt == "fp16":  # half precision: logits within a few thousandths of their scale
        assert np.abs(out - ref).max() < 0.02 * np.abs(ref).max()


def test_int4_refuses_a_cnn():
    with pytest.raises(InputError, match="int4 quantizes MatMul weights only"):
        quantize(onnx.load(RESNET), "int4")


def test_int8_needs_data_and_unknown_format(vit):
    with pytest.raises(InputError, match="needs calibration data"):
        quantize(vit[0], "int8")
    with pytest.raises(InputError, match="--quantize must be one of"):
        quantize(vit[0], "int2")


def test_quantize_alone_writes_four_rows(tmp_path):
    """--remove 0 --quantize int8 on the ViT: the quantized model is written (nothing removed), the report's
    four rows are measured, and the pruned rows equal the original's (nothing was pruned)."""
    from onnx_consensus.cli import main

    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    code = main([VIT, str(out), "--calib", VIT_CALIB, "--max-samples", "40", "--remove", "0", "--quantize", "int8",
                 "--report", str(rep), "-q", "--no-latency"])
    assert code == 0
    written = onnx.load(out)
    assert interface(written) == interface(onnx.load(VIT))
    assert any(n.op_type == "QuantizeLinear" for n in written.graph.node)
    q = json.load(open(rep))["quantize"]
    assert [r["name"] for r in q["rows"]] == ["original", "quantized", "pruned", "pruned + quantized"]
    rows = {r["name"]: r for r in q["rows"]}
    assert rows["original"]["fidelity"]["agreement"] == 1.0
    assert rows["pruned"]["bytes"] == rows["original"]["bytes"]
    assert os.path.getsize(out) < os.path.getsize(VIT) / 1.5
    assert rows["pruned + quantized"]["bytes"] < rows["pruned"]["bytes"] / 1.5
    assert rows["pruned + quantized"]["fidelity"]["agreement"] >= 0.85
    assert rows["quantized"]["macs"] == rows["original"]["macs"]


def test_int8_old_opset_is_converted_for_per_channel(tmp_path):
    """A model at opset 11 (DequantizeLinear has no axis there): converted to 13, per-channel scales, same
    interface, and it runs close to the float model."""
    from onnx_consensus.quantize import PER_CHANNEL_OPSET
    from tests.helpers import residual_mlp

    model = residual_mlp(4, 32, opset=11)
    (tmp_path / "c").mkdir()
    np.save(tmp_path / "c" / "x.npy", np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32))
    data = load_calibration(str(tmp_path / "c"), model)
    q = quantize(model, "int8", data, np.arange(32))
    assert next(o.version for o in q.opset_import if o.domain == "") == PER_CHANNEL_OPSET
    assert interface(q) == interface(model)
    scales = [t for t in q.graph.initializer if t.name.endswith("_scale") and len(t.dims) == 1 and t.dims[0] == 32]
    assert scales  # a weight's scale per output channel
    feed = next(data.batches(32))
    ref, out = _outputs(model, feed), _outputs(q, feed)
    assert float(np.mean(ref.argmax(1) == out.argmax(1))) >= 0.9


def test_quantize_rows_on_eval_data(tmp_path):
    """--eval: the four rows are measured on all of the eval data (its labels give the accuracy)."""
    from onnx_consensus.cli import main

    out, rep, ev = tmp_path / "q.onnx", tmp_path / "r.json", tmp_path / "eval"
    ev.mkdir()
    np.save(ev / "x.npy", np.load(os.path.join(VIT_CALIB, "calib.npy"))[-40:])
    np.save(ev / "labels.npy", np.load(os.path.join(VIT_CALIB, "labels.npy"))[-40:])
    code = main([VIT, str(out), "--calib", VIT_CALIB, "--max-samples", "30", "--remove", "1", "--quantize", "fp16",
                 "--eval", str(ev), "--report", str(rep), "-q", "--no-latency"])
    assert code == 0
    q = json.load(open(rep))["quantize"]
    assert q["samples"] == 40  # the whole eval folder, not the 6-sample hold-out
    rows = {r["name"]: r for r in q["rows"]}
    assert rows["original"]["accuracy"] is not None and rows["original"]["fidelity"]["n"] == 40
    assert abs(rows["pruned + quantized"]["accuracy"] - rows["pruned"]["accuracy"]) < 0.02  # fp16 ~ float32
