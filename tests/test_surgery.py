"""Surgery: removal keeps the interface, runs, removes exact MACs, and is exact for zeroed branches."""
import numpy as np
import onnx
import pytest

from onnx_consensus.graph.blocks import find_blocks
from onnx_consensus.graph.flops import count_cost
from onnx_consensus.graph.ir import interface
from onnx_consensus.graph.surgery import remove_blocks
from tests.helpers import randomize_names, resnet_onnx, run, tiny_residual_graph, zero_branch

X = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("form", ["folded", "bn", "dynamo"])
def test_removal_keeps_interface_and_runs(form):
    model = randomize_names(resnet_onnx(20, form), seed=1)
    blocks = find_blocks(model).blocks
    pruned = remove_blocks(model, blocks[::2])
    onnx.checker.check_model(pruned, full_check=True)
    assert interface(pruned) == interface(model)
    name = model.graph.input[0].name
    for batch in (1, 5):
        out = run(pruned, {name: np.repeat(X[:1], batch, 0)})[0]
        assert out.shape == (batch, 10)
    # the remaining blocks are still found, under their original ids
    remaining = {b.id for b in find_blocks(pruned).blocks}
    assert remaining == {b.id for b in blocks[1::2]}


def test_input_model_not_modified():
    model = resnet_onnx(20, "folded")
    before = model.SerializeToString()
    remove_blocks(model, find_blocks(model).blocks[:3])
    assert model.SerializeToString() == before


@pytest.mark.parametrize("n", [1, 5, 10])
def test_removing_n_blocks_removes_exact_macs(n):
    model = resnet_onnx(56, "folded")
    blocks = find_blocks(model).blocks
    rng = np.random.default_rng(n)
    chosen = [blocks[i] for i in sorted(rng.choice(len(blocks), n, replace=False))]
    before = count_cost(model).total_macs
    after = count_cost(remove_blocks(model, chosen)).total_macs
    assert before == 125_747_840
    assert before - after == n * 4_718_592


@pytest.mark.parametrize("form", ["folded", "bn"])
def test_zeroed_branch_removal_is_exact(form):
    model = randomize_names(resnet_onnx(20, form), seed=2, keep_io=True)
    blocks = find_blocks(model).blocks
    target = blocks[4]
    zero_branch(model, target)
    ref = run(model, {"input": X})[0]
    out = run(remove_blocks(model, [target]), {"input": X})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_exit_that_is_a_graph_output_keeps_its_name():
    model = tiny_residual_graph(exit_is_output=True)
    pruned = remove_blocks(model, find_blocks(model).blocks)
    assert [o.name for o in pruned.graph.output] == ["y", "r"]
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    y, r = run(pruned, {"x": x})
    h = x @ onnx.numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_allclose(r, h, rtol=1e-6)


def test_side_input_stays_an_input():
    model = tiny_residual_graph(side_input=True)
    pruned = remove_blocks(model, find_blocks(model).blocks)
    assert [i.name for i in pruned.graph.input] == ["x", "bias"]
    onnx.checker.check_model(pruned, full_check=True)


def test_metadata_and_opset_survive():
    model = resnet_onnx(20, "bn")
    model.metadata_props.add(key="owner", value="me")
    model.doc_string = "doc"
    pruned = remove_blocks(model, find_blocks(model).blocks[:1])
    assert [(p.key, p.value) for p in pruned.metadata_props] == [("owner", "me")]
    assert pruned.doc_string == "doc"
    assert list(pruned.opset_import) == list(model.opset_import)
    assert pruned.ir_version == model.ir_version
