"""Name-level graph edits (graph/proto_edit.py): checked by what onnxruntime computes from the edited graph."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnx_consensus.graph.proto_edit import drop_dead, outer_reads, rename, substitute_reads, toposorted

X = np.arange(-3, 3, dtype=np.float32).reshape(2, 3)


def _run(model: onnx.ModelProto, **feeds) -> list[np.ndarray]:
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": X, **feeds})


def _branch(name: str, nodes: list[onnx.NodeProto], out: str) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, [2, 3])])


def _model_with_if() -> onnx.ModelProto:
    """a = Relu(x), b = Neg(x); y = If(cond): then Identity(a) (an outer read), else Identity(Abs(b)) (an outer
    read and a local name); z = Sigmoid(a)."""
    then = _branch("then", [helper.make_node("Identity", ["a"], ["t_out"])], "t_out")
    other = _branch("else", [helper.make_node("Abs", ["b"], ["e_a"]), helper.make_node("Identity", ["e_a"], ["e_out"])],
                    "e_out")
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
             helper.make_node("Sigmoid", ["a"], ["z"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                     helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_outer_reads_sees_through_subgraphs_but_not_their_own_names():
    if_node = _model_with_if().graph.node[2]
    assert outer_reads(if_node) == {"cond", "a", "b"}  # not e_a: the else-branch makes it


@pytest.mark.parametrize("cond", [True, False])
def test_substitute_reads_reaches_outer_reads_in_subgraphs(cond):
    model = _model_with_if()
    substitute_reads(model.graph, {"a": "b", "e_a": "b"})  # e_a: a name the subgraph makes itself
    y, z = _run(model, cond=np.array(cond))
    np.testing.assert_allclose(z, 1 / (1 + np.exp(X)), rtol=1e-6)  # Sigmoid(-x): the outer reader moved to b
    # then: the outer read of a moved to b (-x); else: reads of its own e_a = Abs(b) untouched (|x|)
    np.testing.assert_array_equal(y, -X if cond else np.abs(X))
    assert model.graph.node[0].output[0] == "a"  # producers keep their names


def test_substitute_reads_follows_chains():
    model = _model_with_if()
    model.graph.node.insert(2, helper.make_node("Exp", ["b"], ["c"]))
    substitute_reads(model.graph, {"a": "c", "c": "b"})  # readers of a read c, whose readers read b: a -> b
    np.testing.assert_allclose(_run(model, cond=np.array(True))[1], 1 / (1 + np.exp(X)), rtol=1e-6)


def test_rename_is_simultaneous_and_reaches_subgraphs():
    model = _model_with_if()
    rename(model.graph, {"a": "b", "b": "a", "z": "zz"})  # a swap: only a simultaneous map keeps it right
    assert [o.name for o in model.graph.output] == ["y", "zz"]
    for cond in (True, False):
        got = _run(model, cond=np.array(cond))
        ref = _run(_model_with_if(), cond=np.array(cond))
        for g, r in zip(got, ref):
            np.testing.assert_array_equal(g, r)
    branches = {a.name: a.g for a in model.graph.node[2].attribute}
    assert [n.input[0] for n in branches["else_branch"].node] == ["a", "e_a"]  # the outer read of b is now a
    assert [n.input[0] for n in branches["then_branch"].node] == ["b"]


def test_drop_dead_removes_what_no_output_needs_and_keeps_the_interface():
    model = _model_with_if()
    w = helper.make_tensor("w", TensorProto.FLOAT, [3], [1, 2, 3])
    unused = helper.make_tensor("unused", TensorProto.FLOAT, [1], [0])
    model.graph.initializer.extend([w, unused])
    model.graph.node.extend([helper.make_node("Mul", ["x", "w"], ["dead1"]), helper.make_node("Exp", ["dead1"],
                                                                                             ["dead2"])])
    model.graph.value_info.extend([helper.make_tensor_value_info("dead2", TensorProto.FLOAT, [2, 3]),
                                   helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3])])
    del model.graph.output[1]  # z's Sigmoid is dead now; the If still reads a and b
    drop_dead(model.graph)
    assert [n.op_type for n in model.graph.node] == ["Relu", "Neg", "If"]
    assert not model.graph.initializer
    assert [v.name for v in model.graph.value_info] == ["a"]
    assert [v.name for v in model.graph.input] == ["x", "cond"]  # graph inputs stay
    np.testing.assert_array_equal(_run(model, cond=np.array(True))[0], np.maximum(X, 0))


def test_toposorted_orders_a_shuffled_graph_and_leaves_a_sorted_one_alone():
    model = _model_with_if()
    sorted_bytes = model.SerializeToString()
    assert toposorted(model.graph) and model.SerializeToString() == sorted_bytes
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    assert toposorted(model.graph)
    order = [n.op_type for n in model.graph.node]
    assert order.index("If") > max(order.index("Relu"), order.index("Neg"))  # the If reads a and b
    assert order.index("Sigmoid") > order.index("Relu")
    np.testing.assert_array_equal(_run(model, cond=np.array(True))[0], np.maximum(X, 0))


def test_toposorted_reports_a_cycle():
    graph = helper.make_graph([helper.make_node("Relu", ["q"], ["p"]), helper.make_node("Neg", ["p"], ["q"])], "c",
                              [], [helper.make_tensor_value_info("p", TensorProto.FLOAT, None)])
    assert not toposorted(graph)
    assert len(graph.node) == 2
