"""Block detection on exported CIFAR ResNets (three export forms, random names) and hand-built graphs."""
import numpy as np
import pytest

from onnx_consensus.graph.blocks import find_blocks
from tests.helpers import randomize_names, resnet_onnx, tiny_residual_graph

FORMS = ("folded", "bn", "dynamo")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("depth", [20, 56])
def test_resnet_block_counts_with_random_names(depth, form):
    n = (depth - 2) // 6
    model = randomize_names(resnet_onnx(depth, form), seed=depth)
    report = find_blocks(model)
    assert len(report.blocks) == 3 * n - 2
    projections = [r for r in report.not_removable if "projection" in r.reason]
    assert len(projections) == 2
    # stage structure: n blocks at 16 channels, n-1 at 32, n-1 at 64
    stages = [b.stage for b in report.blocks]
    assert stages == [0] * n + [1] * (n - 1) + [2] * (n - 1)
    assert [b.shape[1] for b in report.blocks] == [16] * n + [32] * (n - 1) + [64] * (n - 1)
    for b in report.blocks:
        assert b.id == b.exit and b.entry != b.exit
        assert b.side_inputs == ()


def test_resnet32_count():
    assert len(find_blocks(resnet_onnx(32, "folded")).blocks) == 13


def test_detection_independent_of_names():
    base = resnet_onnx(20, "bn")
    shapes = [(b.shape[1:], len(b.nodes)) for b in find_blocks(base).blocks]
    for seed in range(3):
        renamed = find_blocks(randomize_names(base, seed=seed)).blocks
        assert [(b.shape[1:], len(b.nodes)) for b in renamed] == shapes


def test_block_macs_resnet56():
    report = find_blocks(resnet_onnx(56, "folded"))
    assert all(b.macs == 4_718_592 for b in report.blocks)


def test_post_merge_relu_belongs_to_block():
    model = resnet_onnx(20, "folded")
    ops = {n.output[0]: n.op_type for n in model.graph.node}
    for b in find_blocks(model).blocks:
        assert ops[b.exit] == "Relu"
        assert ops[b.merge] == "Add"


def test_sum_merge_and_side_input():
    report = find_blocks(tiny_residual_graph(side_input=True, merge="Sum"))
    assert len(report.blocks) == 1
    b = report.blocks[0]
    assert (b.entry, b.exit) == ("h", "r")
    assert b.side_inputs == ("bias",)


def test_branch_read_outside_is_not_removable():
    model = tiny_residual_graph()
    # a second consumer of the branch tensor b0 outside the block: the block has two exits
    from onnx import helper, TensorProto
    model.graph.node.append(helper.make_node("Identity", ["b0"], ["leak"]))
    model.graph.output.append(helper.make_tensor_value_info("leak", TensorProto.FLOAT, ["N", 4]))
    report = find_blocks(model)
    assert report.blocks == []
    assert "outside" in report.not_removable[0].reason or "graph output" in report.not_removable[0].reason


def test_bias_add_is_not_a_merge():
    from onnx import helper, numpy_helper, TensorProto
    import onnx
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.ones((2, 4), np.float32), "c")])
    report = find_blocks(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    assert report.blocks == [] and report.not_removable == []
    del onnx
