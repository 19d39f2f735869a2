"""Scoring: suffix-model features equal the pruned model's (the unpruned model as reference); shared
weights give the same features; local scope compares entry with exit."""
import numpy as np
import pytest

from onnx_consensus.data import load_calibration
from onnx_consensus.graph.blocks import find_blocks
from onnx_consensus.graph.instrument import expose
from onnx_consensus.kinds.outputs import find_feature_tensor
from onnx_consensus.graph.surgery import remove_blocks
from onnx_consensus.metrics.features import pool_features
from onnx_consensus.scoring import collect_features, score_blocks
from tests.helpers import resnet_onnx, run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("scoring")
    x = np.random.default_rng(1).standard_normal((24, 3, 32, 32)).astype(np.float32)
    np.save(d / "x.npy", x)
    model = resnet_onnx(20, "bn")
    return model, load_calibration(d, model), x


@pytest.mark.parametrize("share", [False, True])
def test_global_features_equal_pruned_model_features(setup, share):
    model, data, x = setup
    blocks = find_blocks(model).blocks
    feats = collect_features(model, data, blocks, batch_size=10, share_weights=share)
    feature = feats.feature
    assert feats.scope == "global" and feature == find_feature_tensor(model) and feats.n_samples == 24
    ref = run(expose(model, [feature]), {"input": x})
    np.testing.assert_array_equal(feats.predictions, ref[0].argmax(1))
    for b in blocks:
        X, Y = feats.pair(b.id)
        np.testing.assert_allclose(X, pool_features(ref[1]), rtol=1e-4, atol=1e-5)
        pruned = expose(remove_blocks(model, [b]), [feature])
        want = pool_features(run(pruned, {"input": x})[1])
        np.testing.assert_allclose(Y, want, rtol=1e-4, atol=1e-4)


def test_local_scope_is_entry_vs_exit(setup):
    model, data, x = setup
    blocks = find_blocks(model).blocks[:3]
    feats = collect_features(model, data, blocks, scope="local", batch_size=10)
    assert feats.scope == "local" and feats.feature is None
    exposed = expose(model, [t for b in blocks for t in (b.entry, b.exit)])
    outs = dict(zip([o.name for o in exposed.graph.output], run(exposed, {"input": x})))
    for b in blocks:
        X, Y = feats.pair(b.id)
        np.testing.assert_allclose(X, pool_features(outs[b.entry]), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(Y, pool_features(outs[b.exit]), rtol=1e-4, atol=1e-5)


def test_round_reports_every_metric_and_rank(setup):
    model, data, _ = setup
    rnd = score_blocks(model, data, batch_size=12)
    assert rnd.n_samples == 24 and len(rnd.blocks) == 7 and len(rnd.metrics) == 8
    for b in rnd.blocks:
        assert set(b.scores) == set(b.ranks) == set(rnd.metrics)
        assert all(np.isfinite(v) for v in b.scores.values())
        assert b.rank_sum == pytest.approx(sum(b.ranks.values()))
    assert [b.rank_sum for b in rnd.blocks] == sorted(b.rank_sum for b in rnd.blocks)
