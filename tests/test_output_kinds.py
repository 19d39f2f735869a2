"""Issue 12: output kinds of softmax heads that the exporter wrote out in elementwise ops.

tf2onnx / jax2tf write a softmax as Exp / ReduceSum / Div, often after subtracting the row max (magika's
214-class head: ``Max(-inf, ReduceMax(x))`` reshaped and broadcast, subtracted, Exp, ReduceSum, Reshape,
Expand, Div). ``heads.output_kinds`` must call such outputs class scores, as it does a Softmax node. Each
graph below is first checked against a closed-form softmax with onnxruntime, so a test cannot pass on a
graph that does not compute what its name says.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_consensus.kinds.outputs import choose_feature, output_kinds

N_IN, N_CLASSES = 6, 5
RNG = np.random.default_rng(0)
W = RNG.normal(size=(N_IN, N_CLASSES)).astype(np.float32)
B = RNG.normal(size=(N_CLASSES,)).astype(np.float32)


def _const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _model(tail: list[onnx.NodeProto], out: str, inits: list[onnx.TensorProto], width=N_CLASSES) -> onnx.ModelProto:
    """x (N, 6) -> MatMul W, Add b -> z (N, 5) -> ``tail`` -> ``out`` (N, width)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "B"], ["z"]), *tail]
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", N_IN])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", width])],
        [_const("W", W), _const("B", B), *inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


AXES = [_const("axes", np.array([1], np.int64))]


def plain_div():
    """Exp(z) / ReduceSum(Exp(z)) (keepdims: broadcast by Div)."""
    return [helper.make_node("Exp", ["z"], ["e"]), helper.make_node("ReduceSum", ["e", "axes"], ["s"]),
            helper.make_node("Div", ["e", "s"], ["p"])], AXES, "softmax"


def jax_style():
    """magika's tail: m = Max(-inf, ReduceMax(z, keepdims 0)), Reshape, Expand; Sub; Exp; ReduceSum (keepdims
    0); Reshape; Expand; Div."""
    nodes = [
        helper.make_node("ReduceMax", ["z"], ["zmax"], axes=[1], keepdims=0),
        helper.make_node("Max", ["ninf", "zmax"], ["zmax2"]),
        helper.make_node("Reshape", ["zmax2", "col"], ["zmax3"]),
        helper.make_node("Shape", ["z"], ["zshape"]),
        helper.make_node("Expand", ["zmax3", "zshape"], ["zmaxb"]),
        helper.make_node("Sub", ["z", "zmaxb"], ["zs"]),
        helper.make_node("Exp", ["zs"], ["e"]),
        helper.make_node("ReduceSum", ["e", "axes"], ["s"], keepdims=0),
        helper.make_node("Reshape", ["s", "col"], ["s2"]),
        helper.make_node("Expand", ["s2", "zshape"], ["sb"]),
        helper.make_node("Div", ["e", "sb"], ["p"]),
    ]
    inits = AXES + [_const("ninf", np.array(-np.inf, np.float32)), _const("col", np.array([-1, 1], np.int64))]
    return nodes, inits, "softmax"


def reciprocal():
    """Exp(z - ReduceMax(z)) * Reciprocal(ReduceSum(...))."""
    nodes = [helper.make_node("ReduceMax", ["z"], ["zmax"], axes=[1], keepdims=1),
             helper.make_node("Sub", ["z", "zmax"], ["zs"]), helper.make_node("Exp", ["zs"], ["e"]),
             helper.make_node("ReduceSum", ["e", "axes"], ["s"]), helper.make_node("Reciprocal", ["s"], ["r"]),
             helper.make_node("Mul", ["e", "r"], ["p"])]
    return nodes, AXES, "softmax"


def log_softmax():
    """z - Log(ReduceSum(Exp(z)))."""
    nodes = [helper.make_node("Exp", ["z"], ["e"]), helper.make_node("ReduceSum", ["e", "axes"], ["s"]),
             helper.make_node("Log", ["s"], ["ls"]), helper.make_node("Sub", ["z", "ls"], ["p"])]
    return nodes, AXES, "log_softmax"


def logsumexp():
    """(z - max) - ReduceLogSumExp(z - max)."""
    nodes = [helper.make_node("ReduceMax", ["z"], ["zmax"], axes=[1], keepdims=1),
             helper.make_node("Sub", ["z", "zmax"], ["zs"]),
             helper.make_node("ReduceLogSumExp", ["zs"], ["lse"], axes=[1], keepdims=1),
             helper.make_node("Sub", ["zs", "lse"], ["p"])]
    return nodes, [], "log_softmax"


@pytest.mark.parametrize("make", [plain_div, jax_style, reciprocal, log_softmax, logsumexp])
def test_decomposed_softmax_is_class_scores(make):
    nodes, inits, what = make()
    model = _model(nodes, "p", inits)
    x = RNG.normal(size=(4, N_IN)).astype(np.float32)
    want = _softmax(x @ W + B)
    got = _run(model, x)
    np.testing.assert_allclose(got, want if what == "softmax" else np.log(want), rtol=1e-5, atol=1e-6)
    assert output_kinds(model) == {"p": "class scores"}
    choice = choose_feature(model)
    assert choice.head and choice.tensors == ("x",), choice  # the MatMul's input is the classifier's input


def test_exp_over_an_unrelated_sum_is_not_softmax():
    """Exp(z) divided by the sum of another tensor's Exp is no softmax: an embedding, not class scores."""
    nodes = [helper.make_node("Exp", ["z"], ["e"]), helper.make_node("Neg", ["z"], ["nz"]),
             helper.make_node("Exp", ["nz"], ["e2"]), helper.make_node("ReduceSum", ["e2", "axes"], ["s"]),
             helper.make_node("Div", ["e", "s"], ["p"])]
    assert output_kinds(_model(nodes, "p", AXES)) == {"p": "embedding"}


def test_single_column_output_is_generic():
    """An (N, 1) sigmoid score (silero's speech probability): a cosine of one number is its sign, so generic."""
    nodes = [helper.make_node("ReduceMean", ["z"], ["m"], axes=[1], keepdims=1),
             helper.make_node("Sigmoid", ["m"], ["p"])]
    assert output_kinds(_model(nodes, "p", [], width=1)) == {"p": "generic"}
