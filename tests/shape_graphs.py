"""Small hand-built graphs for the shape-inference tests (issue 12, failures 3, 4, 7, 8)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)


def _w(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _const(name: str, values) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64)))


def paddle_flatten(batch="N", opset: int = 12) -> onnx.ModelProto:
    """A Paddle-style recogniser head: x (batch, 8, H, W) is flattened by Reshape to Shape(x)[0:2] + [-1], then
    transposed to tokens (batch, H*W, 8), followed by two residual MatMul sub-blocks (8x8 weights). At opset
    12 ONNX's shape inference leaves the Reshape's output (and everything after it) without a rank;
    onnxruntime's symbolic inference resolves it."""
    nodes = [_const("s0", [0]), _const("s2", [2]), _const("m1", [-1]),
             helper.make_node("Shape", ["x"], ["shp"]),
             helper.make_node("Slice", ["shp", "s0", "s2", "s0"], ["nc"]),
             helper.make_node("Concat", ["nc", "m1"], ["tgt"], axis=0),
             helper.make_node("Reshape", ["x", "tgt"], ["flat"]),
             helper.make_node("Transpose", ["flat"], ["tok"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["tok", "w1"], ["mm1"]),
             helper.make_node("Add", ["tok", "mm1"], ["res1"]),
             helper.make_node("MatMul", ["res1", "w2"], ["mm2"]),
             helper.make_node("Add", ["res1", "mm2"], ["y"])]
    g = helper.make_graph(nodes, "paddle_flatten",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, "L", 8])],
                          [_w("w1", 8, 8), _w("w2", 8, 8)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def conv_minus_one(batch: int = -1, hw=(8, 8)) -> onnx.ModelProto:
    """x (batch, 3, H, W) with the batch written as a dim value of -1 (as Paddle writes it; H, W too when
    ``hw`` holds -1); one 3x3 Conv (pads 1) to 4 channels: 4*3*9 = 108 MACs per output pixel."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, *hw])
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv_m1", [x],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, *hw])],
                          [_w("w", 4, 3, 3, 3)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def custom_op_matmul() -> onnx.ModelProto:
    """x (N, 8) -> an op of an unknown domain (no shape for its output anywhere) -> MatMul (8x8): symbolic
    shape inference cannot complete, the case where onnxruntime's entry point saves its partial model (with
    external data) into the working directory. The weight is large enough (64x64 -> 4096 elements) to be a
    weight in the weight-free copy."""
    g = helper.make_graph([helper.make_node("Foo", ["x"], ["f"], domain="com.example"),
                           helper.make_node("MatMul", ["f", "w"], ["y"])], "custom",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])], [_w("w", 64, 64)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])


def _branch(name: str, n_matmuls: int, batch) -> onnx.GraphProto:
    """An If branch reading x (2, 8) from the outer scope: n_matmuls chained MatMuls by w (8x8)."""
    nodes, t = [], "x"
    for i in range(n_matmuls):
        nodes.append(helper.make_node("MatMul", [t, "w"], [f"{name}_{i}"]))
        t = f"{name}_{i}"
    nodes.append(helper.make_node("Identity", [t], [f"{name}_out"]))
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT,
                                                                              [batch, 8])])


def if_matmuls(batch=2) -> onnx.ModelProto:
    """y = If(c, then: x @ w, else: x @ w @ w) with x (batch, 8), w (8x8): 64*batch MACs in the then branch,
    128*batch in the else branch (the costlier)."""
    node = helper.make_node("If", ["c"], ["y"], then_branch=_branch("then", 1, batch),
                            else_branch=_branch("else", 2, batch))
    g = helper.make_graph([node], "if_matmuls",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8]),
                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8])], [_w("w", 8, 8)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def loop_matmul() -> onnx.ModelProto:
    """A Loop (trip count an input) whose body multiplies the carried state s (2, 8) by w (8x8): 128 MACs
    per iteration."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["s_in", "w"], ["s_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [2, 8])])
    g = helper.make_graph([helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)], "loop",
                          [helper.make_tensor_value_info("n", TensorProto.INT64, []),
                           helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [_w("w", 8, 8)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def real_model(name: str) -> str:
    """Path of a corpus model fetched by tools/data/real_models.py into .cache/real-models/; skips when absent
    (these tests never download)."""
    import os

    import pytest

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, ".cache", "real-models", name, "model.onnx")
    if not os.path.isfile(path):
        pytest.skip(f"{name} is not in .cache/real-models (fetch it with tools/data/real_models.py)")
    return path
