"""Graphs with control flow (If, Loop, Scan): blocks inside subgraphs are reported and left alone, tensors
the subgraphs read from the outer scope keep their producers, and the rest of the graph is pruned normally."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from onnx_consensus.cli import main
from onnx_consensus.graph.blocks import find_blocks
from onnx_consensus.graph.ir import interface
from tests.helpers import run


def _res(prefix: str, x: str, w: str) -> tuple[list[onnx.NodeProto], str]:
    """x + Relu(x @ w) -> '<prefix>_out'."""
    return [h.make_node("MatMul", [x, w], [f"{prefix}_m"]), h.make_node("Relu", [f"{prefix}_m"], [f"{prefix}_r"]),
            h.make_node("Add", [x, f"{prefix}_r"], [f"{prefix}_out"])], f"{prefix}_out"


def _vi(name, shape, elem=TensorProto.FLOAT):
    return h.make_tensor_value_info(name, elem, shape)


def control_flow_model(kind: str, zero: tuple[str, ...] = ()) -> onnx.ModelProto:
    """x(N,4) -> MatMul -> blocks a, b, c -> a control-flow node with a residual block in its subgraph
    -> MatMul -> y(N,4). ``kind``: "If" (then: a block on c's exit; else: reads b's inner tensor b_m from the
    outer scope, so b is not removable; the condition is mean(x) > 0), "Loop" (2 iterations of a block on
    the state), "Scan" (a block on each row). ``zero``: main-graph blocks whose branch weight is zero."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(np.zeros((4, 4), np.float32) if n[1:] in zero else
                           (rng.standard_normal((4, 4)) * 0.5).astype(np.float32), n)
             for n in ("w0", "wa", "wb", "wc", "wd", "wout")]
    nodes = [h.make_node("MatMul", ["x", "w0"], ["h0"])]
    x = "h0"
    for p in "abc":
        block, x = _res(p, x, f"w{p}")
        nodes += block
    if kind == "If":
        then_nodes, then_out = _res("t", x, "wd")
        then_g = h.make_graph(then_nodes, "then", [], [_vi(then_out, ["N", 4])])
        else_g = h.make_graph([h.make_node("Identity", ["b_m"], ["e_out"])], "else", [], [_vi("e_out", ["N", 4])])
        inits.append(nh.from_array(np.array(0, np.float32), "zero"))
        nodes += [h.make_node("ReduceMean", ["x"], ["xm"], keepdims=0), h.make_node("Greater", ["xm", "zero"], ["flag"]),
                  h.make_node("If", ["flag"], ["cf_out"], then_branch=then_g, else_branch=else_g)]
    elif kind == "Loop":
        body_nodes, body_out = _res("l", "state_in", "wd")
        body = h.make_graph(body_nodes + [h.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
                            [_vi("iter", [], TensorProto.INT64), _vi("cond_in", [], TensorProto.BOOL),
                             _vi("state_in", ["N", 4])],
                            [_vi("cond_out", [], TensorProto.BOOL), _vi(body_out, ["N", 4])])
        inits += [nh.from_array(np.array(2, np.int64), "trip"), nh.from_array(np.array(True), "true")]
        nodes.append(h.make_node("Loop", ["trip", "true", x], ["cf_out"], body=body))
    else:
        body_nodes, body_out = _res("s", "row_in", "wd")
        body = h.make_graph(body_nodes, "scan", [_vi("row_in", [4])], [_vi(body_out, [4])])
        nodes.append(h.make_node("Scan", [x], ["cf_out"], body=body, num_scan_inputs=1))
    nodes.append(h.make_node("MatMul", ["cf_out", "wout"], ["y"]))
    graph = h.make_graph(nodes, f"cf_{kind}", [_vi("x", ["N", 4])], [_vi("y", ["N", 4])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _subgraph_nodes(model: onnx.ModelProto) -> list[str]:
    return sorted(n.op_type for node in model.graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH
            for n in a.g.node)


@pytest.mark.parametrize("kind", ["If", "Loop", "Scan"])
def test_subgraph_blocks_reported_not_candidates(kind):
    report = find_blocks(control_flow_model(kind))
    inner = {"If": "t_out", "Loop": "l_out", "Scan": "s_out"}[kind]
    assert inner not in report.by_id()
    reasons = {n.merge: n.reason for n in report.not_removable}
    assert inner in reasons and "subgraph" in reasons[inner]
    # b's inner tensor is read by the If's else-branch from the outer scope: removing b would dangle it
    expected = {"a_out", "c_out"} if kind == "If" else {"a_out", "b_out", "c_out"}
    assert set(report.by_id()) == expected
    if kind == "If":
        assert "read outside the block" in reasons["b_out"]


@pytest.mark.parametrize("kind", ["If", "Loop", "Scan"])
def test_prune_around_control_flow(tmp_path, kind):
    """Blocks a and c have an exactly zero branch: removing them leaves every output unchanged, on both
    paths of the If; the subgraph and its block are untouched."""
    model = control_flow_model(kind, zero=("a", "c"))
    src, out, calib = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "calib"
    onnx.save(model, src)
    calib.mkdir()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((48, 4)).astype(np.float32)
    x[:24] += 2.0  # some batches take the then-branch, some the else-branch
    np.save(calib / "x.npy", x)
    before = src.read_bytes()
    code = main([str(src), str(out), "--calib", str(calib), "--remove", "2", "--only", "a_out,c_out", "--keep-per-stage", "0", "-q",
                 "--no-latency", "--metrics", "cka", "--batch-size", "24"])
    assert code == 0 and src.read_bytes() == before
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    assert interface(pruned) == interface(model)
    assert _subgraph_nodes(pruned) == _subgraph_nodes(model)
    assert len(pruned.graph.node) == len(model.graph.node) - 6
    for half in (x[:24], x[24:]):
        np.testing.assert_allclose(run(pruned, {"x": half})[0], run(model, {"x": half})[0], rtol=1e-6, atol=1e-6)
