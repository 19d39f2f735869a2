"""Model builders for tests/test_bridge.py (no test functions here)."""
from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn


def _randomize_bn(net: nn.Module) -> None:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.2, 0.6)
                m.bias.uniform_(-0.1, 0.1)


def export_case(name: str) -> tuple[onnx.ModelProto, "callable"]:
    """Export one named test model; returns (model, make_inputs(batch, seq) -> dict name -> ndarray).

    Exports are cached under .cache/test-models (the dynamo exporter takes seconds) and shared with the other
    suites where the model is the same: the ResNet-20 forms are tests.helpers.resnet_onnx_path's (same
    network, seed and BN statistics), the encoder and decoder test_transformers' 2-layer ``tx_onnx``; the
    others are ``bridge-NAME.onnx``."""
    from tests.helpers import CACHE, resnet_onnx_path

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    if name.startswith("resnet20"):
        return onnx.load(resnet_onnx_path(20, name.split("-")[1], 0)), _image_inputs("input", (3, 32, 32))
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"bridge-{name}.onnx")
    tmp = path + f".{os.getpid()}.tmp"
    if name.startswith("mobilenet"):
        from models.mobilenet_v2 import export_onnx, mobilenet_v2

        if not os.path.exists(path):
            net = mobilenet_v2(width_mult=0.25, stages=4)
            _randomize_bn(net)
            export_onnx(net, tmp, opset=17, fold_bn=name.endswith("folded"))
            os.replace(tmp, path)
        return onnx.load(path), _image_inputs("input", (3, 32, 32))
    from models import tiny_transformers as tt

    dynamo = name.endswith("dynamo")
    if name.startswith(("encoder", "decoder")):  # test_transformers' 2-layer models: one export for both suites
        from tests.test_transformers import _net, tx_onnx

        kind = "post" if name.startswith("encoder") else "dec"
        model = tx_onnx(kind, 2, "dynamo" if dynamo else "classic")
        net = _net(kind, 2, None)
    elif name.startswith("vit"):  # with layer scale, unlike test_transformers' ViT
        net = tt.TinyViT(patch=7, dim=32, depth=2, heads=4)
        if not os.path.exists(path):
            tt.export_onnx(net, tmp, dynamo=dynamo)
            os.replace(tmp, path)
        model = onnx.load(path)
    else:
        raise KeyError(name)

    def make(batch: int, seq: int | None = None) -> dict[str, np.ndarray]:
        g = torch.Generator().manual_seed(batch * 100 + (seq or 0))
        torch.manual_seed(int(torch.randint(0, 10**6, (1,), generator=g)))
        return {n: a.numpy() for n, a in zip(net.input_names, net.example_inputs(batch, seq))}

    return model, make


def _image_inputs(name: str, shape: tuple[int, ...]):
    def make(batch: int, seq: int | None = None) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(batch)
        return {name: rng.standard_normal((batch,) + shape).astype(np.float32)}

    return make


def _const(name: str, arr: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name + "_value"))


def old_opset11_model(seed: int = 0) -> onnx.ModelProto:
    """Opset-11 forms: NHWC Transpose, Conv with Constant-node weights, BN (epsilon, momentum), Sum,
    Split/Squeeze/Unsqueeze/ReduceMean with attributes, Slice with a negative step, Pad reflect (input
    form), Clip (input form), AveragePool with asymmetric pads, Resize linear with sizes, a
    Shape->Gather->Unsqueeze->Concat->Reshape chain and Softmax with opset-11 axis semantics.
    Input x (N, 8, 8, 3) float32 -> y (N, 1, 10) float32."""
    rng = np.random.default_rng(seed)
    f = np.float32
    nodes = [
        helper.make_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2]),
        _const("conv_w", (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(f)),
        _const("conv_b", (rng.standard_normal(8) * 0.1).astype(f)),
        helper.make_node("Conv", ["nchw", "conv_w", "conv_b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["b1"],
                         epsilon=1e-3, momentum=0.8),
        helper.make_node("Clip", ["b1", "clip_lo", "clip_hi"], ["r1"]),
        helper.make_node("Split", ["r1"], ["s1", "s2"], axis=1, split=[4, 4]),
        helper.make_node("Sum", ["s1", "s2", "s1"], ["sum"]),
        helper.make_node("Slice", ["sum", "sl_starts", "sl_ends", "sl_axes", "sl_steps"], ["rev"]),
        helper.make_node("Pad", ["rev", "pad_pads"], ["padded"], mode="reflect"),
        helper.make_node("AveragePool", ["padded"], ["pooled"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[0, 0, 1, 1], count_include_pad=0),
        helper.make_node("Resize", ["pooled", "rs_roi", "rs_scales", "rs_sizes"], ["up"], mode="linear",
                         coordinate_transformation_mode="half_pixel"),
        helper.make_node("ReduceMean", ["up"], ["gap"], axes=[2, 3], keepdims=1),
        helper.make_node("Squeeze", ["gap"], ["vec"], axes=[2, 3]),
        helper.make_node("Unsqueeze", ["vec"], ["vec3"], axes=[1]),
        helper.make_node("MatMul", ["vec3", "fc_w"], ["mm"]),
        helper.make_node("Add", ["mm", "fc_b"], ["logits3"]),
        helper.make_node("Shape", ["x"], ["xshape"]),
        helper.make_node("Gather", ["xshape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch"], ["batch1"], axes=[0]),
        helper.make_node("Concat", ["batch1", "shape_tail"], ["newshape"], axis=0),
        helper.make_node("Reshape", ["logits3", "newshape"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["y"], axis=1),
    ]
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(f), "bn_s"),
        numpy_helper.from_array(rng.uniform(-0.2, 0.2, 8).astype(f), "bn_b"),
        numpy_helper.from_array(rng.uniform(-0.1, 0.1, 8).astype(f), "bn_m"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(f), "bn_v"),
        numpy_helper.from_array(np.array(0.0, f), "clip_lo"),
        numpy_helper.from_array(np.array(6.0, f), "clip_hi"),
        numpy_helper.from_array(np.array([-1], np.int64), "sl_starts"),
        numpy_helper.from_array(np.array([-(2**63)], np.int64), "sl_ends"),
        numpy_helper.from_array(np.array([1], np.int64), "sl_axes"),
        numpy_helper.from_array(np.array([-1], np.int64), "sl_steps"),
        numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "pad_pads"),
        numpy_helper.from_array(np.zeros(0, f), "rs_roi"),
        numpy_helper.from_array(np.zeros(0, f), "rs_scales"),
        numpy_helper.from_array(np.array([0, 0, 0, 0], np.int64), "rs_sizes_unused"),
        numpy_helper.from_array((rng.standard_normal((4, 10)) * 0.5).astype(f), "fc_w"),
        numpy_helper.from_array((rng.standard_normal(10) * 0.1).astype(f), "fc_b"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([1, 10], np.int64), "shape_tail"),
    ]
    # Resize sizes depend on the batch: computed from the pooled tensor's shape at run time
    nodes.insert(11, helper.make_node("Shape", ["pooled"], ["pshape"]))
    nodes.insert(12, helper.make_node("Slice", ["pshape", "rs_s0", "rs_s2"], ["nc"]))
    nodes.insert(13, helper.make_node("Concat", ["nc", "rs_hw"], ["rs_sizes"], axis=0))
    inits += [numpy_helper.from_array(np.array([0], np.int64), "rs_s0"),
              numpy_helper.from_array(np.array([2], np.int64), "rs_s2"),
              numpy_helper.from_array(np.array([7, 9], np.int64), "rs_hw")]
    inits = [t for t in inits if t.name != "rs_sizes_unused"]
    graph = helper.make_graph(
        nodes, "old_opset11", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], producer_name="test")
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def old_opset8_model(seed: int = 0) -> onnx.ModelProto:
    """Opset-8 forms: BN with spatial=1, Clip with min/max attributes, Upsample (scales attribute),
    Slice with starts/ends/axes attributes, MaxPool with ceil_mode=0, Flatten, Gemm (transB) and
    Softmax (opset < 13 axis). Input x (N, 3, 6, 6) -> y (N, 5)."""
    rng = np.random.default_rng(seed)
    f = np.float32
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"], spatial=1, epsilon=1e-5,
                         momentum=0.9),
        helper.make_node("Clip", ["bn"], ["cl"], min=0.0, max=6.0),
        helper.make_node("Upsample", ["cl"], ["up"], mode="nearest", scales=[1.0, 1.0, 2.0, 2.0]),
        helper.make_node("Slice", ["up"], ["sl"], starts=[1, 1], ends=[11, 1000], axes=[2, 3]),
        helper.make_node("MaxPool", ["sl"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["mp"], ["fl"], axis=1),
        helper.make_node("Gemm", ["fl", "fw", "fb"], ["g"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Softmax", ["g"], ["y"], axis=1),
    ]
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(f), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(f), "s"),
        numpy_helper.from_array(rng.uniform(-0.2, 0.2, 4).astype(f), "b"),
        numpy_helper.from_array(rng.uniform(-0.1, 0.1, 4).astype(f), "m"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(f), "v"),
        numpy_helper.from_array((rng.standard_normal((5, 4 * 5 * 5)) * 0.1).astype(f), "fw"),
        numpy_helper.from_array((rng.standard_normal(5) * 0.1).astype(f), "fb"),
    ]
    graph = helper.make_graph(
        nodes, "old_opset8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], producer_name="test")
    model.ir_version = 4
    onnx.checker.check_model(model)
    return model


def old_inputs(shape: tuple[int, ...]):
    def make(batch: int, seq: int | None = None) -> dict[str, np.ndarray]:
        return {"x": np.random.default_rng(batch).standard_normal((batch,) + shape).astype(np.float32)}

    return make


class DigitsNet(nn.Module):
    """Tiny conv net for sklearn digits: (N, 1, 8, 8) -> (N, 10)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.body(x))


def digits_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0 - 0.5).astype(np.float32)[:, None]
    return x, d.target.astype(np.int64)
