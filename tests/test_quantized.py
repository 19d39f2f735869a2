"""Quantized graphs pruned without fine-tuning (issue 23): QDQ (``quantize_static``), dynamic (``quantize_dynamic``:
ConvInteger, MatMulInteger, DynamicQuantizeLinear) and weight-only int4 (``MatMulNBits``) graphs are inspected,
scored and pruned like float ones; parameters and bytes are counted by stored bits, MACs by the op; fine-tuning one
is refused in one line.

Fixtures: the shipped ResNet-56 quantized by ``quantize_static`` (QDQ, 32 shipped calibration images as the
calibration reader) and the shipped ViT by ``quantize_dynamic``; the references are the float models pruned the
same way, and onnxruntime runs everything on the shipped calibration images.
"""
from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_consensus.cli import main
from onnx_consensus.graph.blocks import find_blocks
from onnx_consensus.graph.flops import count_cost
from onnx_consensus.graph.ir import interface
from onnx_consensus.graph.quant import model_bytes, weight_roles
from onnx_consensus.graph.surgery import remove_blocks
from onnx_consensus.pipeline import inspect

quantization = pytest.importorskip("onnxruntime.quantization")
R56, VIT = "models/resnet56_fmnist.onnx", "models/vit_fmnist.onnx"
R56_CALIB, VIT_CALIB = "examples/fmnist_calib", "examples/fmnist_vit_calib"


class _Reader(quantization.CalibrationDataReader):
    """Batches of 16 of the first 32 shipped calibration images."""

    def __init__(self, name: str, x: np.ndarray):
        self._it = iter([{name: x[i:i + 16]} for i in range(0, 32, 16)])

    def get_next(self):
        return next(self._it, None)


@pytest.fixture(scope="module")
def qdq(tmp_path_factory) -> str:
    """models/resnet56_fmnist.onnx through quantize_static: QDQ, uint8 activations, int8 weights, int32 biases."""
    out = str(tmp_path_factory.mktemp("qdq") / "r56_qdq.onnx")
    x = np.load(f"{R56_CALIB}/calib.npy", mmap_mode="r")[:32].astype(np.float32)
    name = onnx.load(R56, load_external_data=False).graph.input[0].name
    quantization.quantize_static(R56, out, _Reader(name, x), quant_format=quantization.QuantFormat.QDQ)
    return out


@pytest.fixture(scope="module")
def dyn_vit(tmp_path_factory) -> str:
    """models/vit_fmnist.onnx through quantize_dynamic: MatMulInteger, ConvInteger, DynamicQuantizeLinear."""
    out = str(tmp_path_factory.mktemp("dyn") / "vit_dyn.onnx")
    quantization.quantize_dynamic(VIT, out)
    return out


def _top1(path_or_model, x: np.ndarray) -> np.ndarray:
    m = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(m, so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(-1)


@functools.lru_cache(maxsize=None)
def _images(folder: str, n: int = 96) -> np.ndarray:
    """The last ``n`` shipped calibration images (not the quantizer's first 32)."""
    return np.asarray(np.load(f"{folder}/calib.npy", mmap_mode="r")[-n:], np.float32)


@functools.lru_cache(maxsize=None)
def _original_top1(path: str, folder: str) -> np.ndarray:
    return _top1(path, _images(folder))


def test_qdq_inspect_lists_the_float_models_blocks_and_counts_stored_bits(qdq):
    f, q = inspect(R56), inspect(qdq)
    assert len(q["blocks"]) == 25 and [b["id"] for b in q["blocks"]] == [b["id"] for b in f["blocks"]]
    assert q["macs"] == f["macs"] == 125_747_840  # reference.md: Conv MACs, quantized or not
    assert q["params"] == f["params"]  # int8 weights and int32 biases are the same parameters
    full = onnx.load(qdq)
    assert q["weight_bytes"] == sum(numpy_helper.to_array(t).nbytes for t in full.graph.initializer)
    assert q["weight_bytes"] < 0.3 * f["weight_bytes"]  # int8 instead of float32, plus scales
    assert "classifier head Gemm" in q["feature"]["reason"]  # through the output's Quantize/DequantizeLinear


def test_qdq_removal_keeps_each_tensor_on_its_own_scale(qdq):
    """The block's exit was quantized again for the next block; without the block the next block reads the
    entry, dequantized with the entry's scale and zero point (no DequantizeLinear -> QuantizeLinear chain is
    left), and the model stays as close to the QDQ original as the float model pruned alike is to the float."""
    model, float_model = onnx.load(qdq), onnx.load(R56)
    blocks, fblocks = find_blocks(model, macs_per_node={}).blocks, find_blocks(float_model, macs_per_node={}).blocks
    pick = [3, 20]
    pruned = remove_blocks(model, [blocks[i] for i in pick])
    onnx.checker.check_model(pruned)
    assert interface(pruned) == interface(model)
    producer = {o: n for n in pruned.graph.node for o in n.output}
    chains = [n for n in pruned.graph.node if n.op_type == "QuantizeLinear"
              and producer.get(n.input[0]) is not None and producer[n.input[0]].op_type == "DequantizeLinear"]
    assert chains == []
    nxt = blocks[pick[0] + 1]  # the next block now reads the removed block's entry
    readers = {n.name for n in pruned.graph.node if blocks[pick[0]].entry in n.input}
    assert {n.name for n in model.graph.node if nxt.entry in n.input} <= readers
    assert blocks[pick[0]].entry.endswith("DequantizeLinear_Output")
    x = _images(R56_CALIB)
    fpruned = remove_blocks(float_model, [fblocks[i] for i in pick])
    top_q, top_f = _top1(pruned, x), _top1(fpruned, x)
    agree_q = (top_q == _original_top1(qdq, R56_CALIB)).mean()
    agree_f = (top_f == _original_top1(R56, R56_CALIB)).mean()
    assert abs(agree_q - agree_f) <= 0.05 and (top_q == top_f).mean() >= 0.95


def _prune_like_float(src: str, float_src: str, calib: str, tmp_path, *extra: str) -> tuple[float, float]:
    """`prune SRC --remove 2`, then the float model with the same blocks removed: top-1 agreement of each with
    its unpruned original on 96 shipped calibration images."""
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    assert main([src, str(out), "--calib", calib, "--max-samples", "24", "--remove", "2", "--no-latency", "-q",
                 "--report", str(rep), *extra]) == 0
    onnx.checker.check_model(str(out), full_check=True)
    written = onnx.load(str(out))
    assert interface(written) == interface(onnx.load(src))
    report = json.loads(rep.read_text())
    removed = report["removed_ids"]
    size = report["weight_bytes"]  # as stored: the quantized weights' bytes, not float32's
    assert size["before"] == inspect(src)["weight_bytes"] and size["after"] == model_bytes(written) < size["before"]
    float_model = onnx.load(float_src)
    fpruned = remove_blocks(float_model, [b for b in find_blocks(float_model, macs_per_node={}).blocks
                                          if b.id in removed])
    assert len(removed) == 2 and len(fpruned.graph.node) < len(float_model.graph.node)
    x = _images(calib)
    return ((_top1(str(out), x) == _original_top1(src, calib)).mean(),
            (_top1(fpruned, x) == _original_top1(float_src, calib)).mean())


def test_qdq_cli_prunes_two_blocks_close_to_the_float_model_pruned_alike(qdq, tmp_path):
    agree_q, agree_f = _prune_like_float(qdq, R56, R56_CALIB, tmp_path, "--metrics", "cosine", "--scope", "local")
    assert abs(agree_q - agree_f) <= 0.05


@pytest.mark.slow
def test_qdq_cli_default_criterion(qdq, tmp_path):
    agree_q, agree_f = _prune_like_float(qdq, R56, R56_CALIB, tmp_path)
    assert abs(agree_q - agree_f) <= 0.05 and agree_q >= 0.8


def test_dynamic_vit_inspected_and_pruned_like_the_float_model(dyn_vit, tmp_path):
    f, q = inspect(VIT), inspect(dyn_vit)
    assert [b["id"] for b in q["blocks"]] == [b["id"] for b in f["blocks"]] and len(q["blocks"]) == 12
    assert q["macs"] == f["macs"]  # MatMulInteger / ConvInteger counted as MatMul / Conv
    assert q["params"] == f["params"]  # the run-time scales (x_scale * w_scale) are no parameters
    assert q["feature"]["tensors"] == f["feature"]["tensors"]  # the MatMulInteger head's float input
    assert q["weight_bytes"] < 0.35 * f["weight_bytes"]
    agree_q, agree_f = _prune_like_float(dyn_vit, VIT, VIT_CALIB, tmp_path, "--metrics", "cosine", "--scope", "local")
    assert abs(agree_q - agree_f) <= 0.05


@pytest.mark.slow
def test_dynamic_vit_default_criterion(dyn_vit, tmp_path):
    agree_q, agree_f = _prune_like_float(dyn_vit, VIT, VIT_CALIB, tmp_path)
    assert abs(agree_q - agree_f) <= 0.05 and agree_q >= 0.8


def test_qoperator_merges_reported_not_removable(tmp_path):
    """quantize_static in QOperator format writes the merges as QLinearAdd on three scales: inspect lists them
    as not removable with what to do instead (QDQ), and counts the float model's parameters."""
    out = str(tmp_path / "qop.onnx")
    x = np.asarray(np.load(f"{R56_CALIB}/calib.npy", mmap_mode="r")[:32], np.float32)
    quantization.quantize_static(R56, out, _Reader(onnx.load(R56).graph.input[0].name, x),
                                 quant_format=quantization.QuantFormat.QOperator)
    q = inspect(out)
    assert q["blocks"] == [] and q["params"] == inspect(R56)["params"]
    reasons = [n["reason"] for n in q["not_removable"]]
    assert len(reasons) == 25 and all("QLinearAdd" in r and "QDQ" in r for r in reasons)  # the float blocks


def test_finetuning_a_quantized_model_refused_in_one_line(dyn_vit, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert main(["finetune", dyn_vit, str(out), "--teacher", VIT, "--train", VIT_CALIB]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "quantized graph" in err and "prune the float model, fine-tune it, then quantize" \
        in err and not out.exists()


def _matmul_nbits_model(tmp_path, k: int = 64, n: int = 32) -> onnx.ModelProto:
    """x (B, K) @ W (K, N), W quantized to 4 bits in blocks of 32 by onnxruntime's MatMulNBitsQuantizer."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", n])],
                          [numpy_helper.from_array(w, "w")])
    q = MatMulNBitsQuantizer(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), block_size=32)
    q.process()
    return q.model.model


def test_matmul_nbits_parameters_bytes_and_macs(tmp_path):
    model = _matmul_nbits_model(tmp_path)
    (node,) = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    cost = count_cost(model, {"x": (3, 64)})
    assert cost.total_macs == 3 * 64 * 32 and cost.params == 64 * 32
    inits = {t.name: t for t in model.graph.initializer}
    assert numpy_helper.to_array(inits[node.input[1]]).nbytes == 64 * 32 // 2  # 4 bits per value
    assert model_bytes(model) == sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    roles = weight_roles(model.graph.node, inits)
    assert roles[node.input[1]] == 64 * 32 and roles[node.input[2]] is None  # weight values; scales: none


def test_int4_and_packed_gather_weights_counted_by_values():
    """DequantizeLinear of an INT4 initializer (two values a byte) and GatherBlockQuantized of uint8-packed int4
    embeddings: parameters are values, bytes half of them."""
    w4 = helper.make_tensor("w4", TensorProto.INT4, [8, 6], np.zeros(48, np.int8).tolist())
    emb = numpy_helper.from_array(np.zeros((10, 8), np.uint8), "emb")  # 10 x 16 int4 values, packed
    nodes = [helper.make_node("DequantizeLinear", ["w4", "s"], ["w"]),
             helper.make_node("GatherBlockQuantized", ["emb", "ids", "es"], ["e"], domain="com.microsoft", bits=4,
                              block_size=16)]
    scales = [numpy_helper.from_array(np.ones(6, np.float32), "s"),
              numpy_helper.from_array(np.ones((10, 1), np.float32), "es")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
                          [helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 6]),
                           helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 16])], [w4, emb, *scales])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    assert count_cost(model).params == 48 + 10 * 16
    assert model_bytes(model) == 48 // 2 + 10 * 8 + 4 * (6 + 10)
