"""The schedule: removal follows the consensus order, zeroed blocks go first, targets and budgets hold."""
import numpy as np
import pytest

from onnx_consensus import pruner as pruner_mod
from onnx_consensus.consensus import consensus
from onnx_consensus.data import load_calibration
from onnx_consensus.errors import TargetError
from onnx_consensus.graph.blocks import find_blocks
from onnx_consensus.pruner import CriterionOptions, RunOptions, TargetOptions, prune
from onnx_consensus.scoring import ScoreRound
from tests.helpers import resnet_onnx, run, zero_branch


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    x = np.random.default_rng(0).standard_normal((80, 3, 32, 32)).astype(np.float32)
    np.save(d / "x.npy", x)
    return d


def _stub_scorer(seed, log):
    rng = np.random.default_rng(seed)

    def fake_score_blocks(model, data, *, blocks, metrics, **kw):
        table = {b.id: {m: float(rng.standard_normal()) for m in ("a", "b", "c")} for b in blocks}
        ranked = consensus(table, {b.id: b.position for b in blocks})
        log.append(ranked)
        return ScoreRound("global", None, ("a", "b", "c"), 1, ranked)
    return fake_score_blocks


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("schedule", ["iterative", "one-shot"])
def test_removal_follows_rank_sum_order(monkeypatch, calib, seed, schedule):
    """Guards against the published code's bug (sorting by score, then applying the mask in layer order)."""
    log = []
    monkeypatch.setattr(pruner_mod, "score_blocks", _stub_scorer(seed, log))
    model = resnet_onnx(20, "folded")
    data = load_calibration(calib, model)
    res = prune(model, data, criterion=CriterionOptions(schedule=schedule),
                target=TargetOptions(remove=4, keep_per_stage=0), run=RunOptions(batch_size=40))
    if schedule == "one-shot":
        assert len(log) == 1
        assert res.removed_ids == [b.id for b in log[0][:4]]
    else:
        assert len(log) == 4
        assert res.removed_ids == [rnd[0].id for rnd in log]
        for k, rnd in enumerate(log):  # each round scores exactly the blocks still present
            assert len(rnd) == 7 - k


def test_zeroed_late_stage_blocks_are_the_ones_removed(calib):
    model = resnet_onnx(32, "folded")
    blocks = find_blocks(model).blocks
    late = [b for b in blocks if b.stage == 2][1:]
    for b in late:
        zero_branch(model, b)
    data = load_calibration(calib, model, max_samples=40)  # 4 rounds of 8 metrics: a zeroed block is exact at any n
    res = prune(model, data, target=TargetOptions(remove=len(late)), run=RunOptions(batch_size=40))
    assert set(res.removed_ids) == {b.id for b in late}
    x = np.load(calib / "x.npy")[:4]
    np.testing.assert_allclose(run(res.model, {"input": x})[0], run(model, {"input": x})[0], rtol=1e-5, atol=1e-5)


def test_keep_per_stage_and_target_flops(calib):
    model = resnet_onnx(20, "folded")
    data = load_calibration(calib, model)
    res = prune(model, data, criterion=CriterionOptions(metrics=("cka",), schedule="one-shot"),
                target=TargetOptions(target_flops=0.15), run=RunOptions(batch_size=40))
    assert (res.macs_before - res.macs_after) / res.macs_before >= 0.15
    assert res.macs_before - res.macs_after == sum(r.block.macs for r in res.removals)
    stages = [r.block.stage for r in res.removals]
    counts = {s: sum(b.stage == s for b in find_blocks(model).blocks) for s in range(3)}
    assert all(stages.count(s) <= counts[s] - 1 for s in range(3))


def test_target_that_cannot_be_met(calib):
    model = resnet_onnx(20, "folded")
    data = load_calibration(calib, model)
    with pytest.raises(TargetError, match="only 4 block"):  # 7 candidates, 3 stages keep one each
        prune(model, data, criterion=CriterionOptions(metrics=("cka",), schedule="one-shot"),
              target=TargetOptions(remove=5), run=RunOptions(batch_size=40))


def test_auto_depth_respects_fidelity_budget(calib):
    model = resnet_onnx(20, "folded")
    for b in find_blocks(model).blocks[:2]:
        zero_branch(model, b)
    data = load_calibration(calib, model)
    res = prune(model, data, criterion=CriterionOptions(metrics=("cka",)), run=RunOptions(batch_size=40))
    assert len(res.removals) >= 2  # the two zeroed blocks cost nothing
    assert res.fidelity.agreement >= 0.99
    for r in res.removals:
        assert r.fidelity.agreement >= 0.99
    assert "fidelity" in res.stop_reason or "no eligible" in res.stop_reason


def test_plan_replays_removals(calib):
    model = resnet_onnx(20, "folded")
    data = load_calibration(calib, model)
    ids = [b.id for b in find_blocks(model).blocks][1:4]
    res = prune(model, data, target=TargetOptions(plan=tuple(ids)), run=RunOptions(batch_size=40))
    assert res.removed_ids == ids and res.rounds == []
