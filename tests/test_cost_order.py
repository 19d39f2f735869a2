"""A default that saves compute: with no target blocks go by damage per unit of compute saved, removals that save
under 1% of the MACs are not written without --force-write, and --remove N says when its picks save almost
nothing. The shipped ResNet-56, whose blocks all cost the same, keeps the criterion's order."""
import os
import subprocess

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_consensus.graph.blocks import find_blocks
from onnx_consensus.graph.flops import count_cost
from onnx_consensus.options import OutputOptions, RunOptions, TargetOptions
from onnx_consensus.pipeline import Options, run
from onnx_consensus.pruner import MIN_MACS_SAVING, cost_aware_order, saving_note
from tests.helpers import CLI, ROOT, env_with_root

WIDTH = 64
BIG, SE = ("h0", "h2", "h4"), ("h1", "h3", "h5")


def se_mlp(seed: int = 0) -> onnx.ModelProto:
    """x (N, 64) -> six residual blocks -> logits (N, 10). h0, h2, h4: h + Relu(h @ W), W (64, 64) small (4,096
    MACs each); h1, h3, h5: squeeze-excitation-like h + h * Sigmoid(mean(h) @ w + b) with b = -8, so the gate is
    ~3e-4 and the block changes almost nothing (1 MAC each)."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for k in range(6):
        if f"h{k}" in BIG:
            w = rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH) * 0.05
            inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{k}"))
            nodes += [helper.make_node("MatMul", [x, f"w{k}"], [f"m{k}"]),
                      helper.make_node("Relu", [f"m{k}"], [f"r{k}"])]
        else:
            inits += [numpy_helper.from_array(np.full((1, 1), 0.1, np.float32), f"w{k}"),
                      numpy_helper.from_array(np.full((1,), -8.0, np.float32), f"b{k}")]
            nodes += [helper.make_node("ReduceMean", [x], [f"p{k}"], axes=[1], keepdims=1),
                      helper.make_node("MatMul", [f"p{k}", f"w{k}"], [f"q{k}"]),
                      helper.make_node("Add", [f"q{k}", f"b{k}"], [f"s{k}"]),
                      helper.make_node("Sigmoid", [f"s{k}"], [f"g{k}"]),
                      helper.make_node("Mul", [x, f"g{k}"], [f"r{k}"])]
        nodes.append(helper.make_node("Add", [x, f"r{k}"], [f"h{k}"]))
        x = f"h{k}"
    inits.append(numpy_helper.from_array((rng.standard_normal((WIDTH, 10)) * 0.3).astype(np.float32), "head"))
    nodes.append(helper.make_node("MatMul", [x, "head"], ["logits"]))
    g = helper.make_graph(nodes, "se", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


@pytest.fixture(scope="module")
def se(tmp_path_factory):
    d = tmp_path_factory.mktemp("se")
    onnx.save(se_mlp(), d / "se.onnx")
    (d / "calib").mkdir()
    np.save(d / "calib" / "x.npy", np.random.default_rng(0).standard_normal((60, WIDTH)).astype(np.float32))
    return d


def test_cost_aware_order_closed_form():
    macs = {"a": 10, "b": 100, "c": 0, "d": 50}
    total = 1000
    # keys (position / share): a 1/0.01 = 100, b 2/0.1 = 20, c inf, d 4/0.05 = 80
    assert cost_aware_order(["a", "b", "c", "d"], macs, total) == ["b", "d", "a", "c"]
    # equal costs: the criterion's order, whatever it is
    same = {k: 7 for k in "abcd"}
    for order in (list("abcd"), list("dbca"), list("cadb")):
        assert cost_aware_order(order, same, 100) == order
    # unknown MACs anywhere: unchanged
    assert cost_aware_order(["a", "b"], {"a": None, "b": 5}, 100) == ["a", "b"]
    assert cost_aware_order(["b", "a"], macs, None) == ["b", "a"]


def test_shipped_resnet56_order_is_unchanged():
    """Every block of the quick start's ResNet-56 costs the same MACs, so the cost-aware order is the
    criterion's, for any order the criterion gives."""
    model = onnx.load(os.path.join(ROOT, "models", "resnet56_fmnist.onnx"))
    cost = count_cost(model, {next(i.name for i in model.graph.input): (1, 3, 32, 32)})
    blocks = find_blocks(model, macs_per_node=cost.macs_per_node).blocks
    assert len(blocks) == 25 and len({b.macs for b in blocks}) == 1
    macs = {b.id: b.macs for b in blocks}
    rng = np.random.default_rng(0)
    for _ in range(20):
        order = [blocks[i].id for i in rng.permutation(len(blocks))]
        assert cost_aware_order(order, macs, cost.total_macs) == order


def test_saving_note_threshold():
    model = se_mlp()
    cost = count_cost(model, {"x": (1, WIDTH)})
    blocks = {b.id: b for b in find_blocks(model, macs_per_node=cost.macs_per_node).blocks}
    note = saving_note([blocks[i] for i in SE], cost.total_macs)
    assert note and "save only 0.02% of the MACs (< 1%)" in note
    assert saving_note([blocks["h0"]], cost.total_macs) is None  # 4096 / 12,931 MACs
    assert saving_note([], cost.total_macs) is None and MIN_MACS_SAVING == 0.01


def _opts(**target):
    return Options(run=RunOptions(threads=1), target=TargetOptions(**target), output=OutputOptions(latency=False))


def test_no_target_removes_compute_first(se):
    """The criterion ranks the near-identity SE blocks least important; with no target the run takes the
    blocks that save compute first (and every pick keeps the fidelity budget)."""
    out = run(str(se / "se.onnx"), str(se / "calib"), _opts())
    first_round = out.result.rounds[0].order
    assert set(first_round[:3]) == set(SE)  # the criterion's view: the SE blocks barely matter
    assert out.removed_ids and out.removed_ids[0] in BIG
    big_removed = [i for i in out.removed_ids if i in BIG]
    assert out.removed_ids[:len(big_removed)] == big_removed  # every big block before any SE block
    assert out.write and out.result.small_saving is None
    assert out.result.fidelity.meets(0.99)


def test_no_target_saving_under_one_percent_is_not_written(se, tmp_path):
    out = run(str(se / "se.onnx"), str(se / "calib"), _opts(only=SE))
    assert out.removed_ids and set(out.removed_ids) <= set(SE)
    assert not out.write and out.status == "saves too little"
    assert "of the MACs (< 1%)" in out.result.small_saving and out.report["small_saving"]
    forced = run(str(se / "se.onnx"), str(se / "calib"),
                 Options(run=RunOptions(threads=1), target=TargetOptions(only=SE),
                         output=OutputOptions(latency=False, force_write=True)))
    assert forced.write


def test_remove_n_warns_when_its_picks_save_almost_nothing(se):
    out = run(str(se / "se.onnx"), str(se / "calib"), _opts(remove=1, only=("h1",)))
    assert out.removed_ids == ["h1"] and out.write
    assert any("save only" in w and "(< 1%)" in w for w in out.warnings)
    fine = run(str(se / "se.onnx"), str(se / "calib"), _opts(remove=1, only=("h0",)))
    assert not any("save only" in w for w in fine.warnings)


def test_cli_says_why_nothing_was_written(se, tmp_path):
    out = tmp_path / "out.onnx"
    p = subprocess.run(CLI + [str(se / "se.onnx"), str(out), "--calib", str(se / "calib"), "--only", ",".join(SE),
                              "-q", "--no-latency", "--threads", "1"], capture_output=True, text=True, cwd=ROOT,
                       env=env_with_root(), timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Nothing written: the" in p.stdout and "(< 1%)" in p.stdout and "--force-write" in p.stdout
    assert not out.exists()
