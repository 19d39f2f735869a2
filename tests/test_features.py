"""Tests of onnx_consensus.metrics.features: pooling, the PCA cap, condition ids."""
from __future__ import annotations

import numpy as np
import pytest

from onnx_consensus.errors import InputError
from onnx_consensus.metrics import score
from onnx_consensus.metrics.features import make_conditions, pca_cap, pool_features





# ---------------------------------------------------------------- pool_features

def test_pool_shapes_and_values():
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((4, 3, 5, 6)).astype(np.float32)
    out = pool_features(conv)
    assert out.shape == (4, 3) and out.dtype == np.float64
    np.testing.assert_allclose(out, conv.astype(np.float64).mean(axis=(2, 3)), rtol=1e-12)
    vol = rng.standard_normal((2, 3, 2, 4, 5))
    np.testing.assert_allclose(pool_features(vol), vol.mean(axis=(2, 3, 4)))
    tokens = rng.standard_normal((4, 7, 5))
    np.testing.assert_allclose(pool_features(tokens), tokens.mean(axis=1))
    flat = rng.standard_normal((4, 9)).astype(np.float16)
    assert pool_features(flat).dtype == np.float64
    np.testing.assert_array_equal(pool_features(flat), flat.astype(np.float64))
    vec = np.arange(5, dtype=np.int32)
    assert pool_features(vec).shape == (5, 1) and pool_features(vec).dtype == np.float64


def test_masked_token_mean_matches_loop():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((5, 8, 3)).astype(np.float32)
    mask = (rng.random((5, 8)) > 0.4).astype(np.int64)
    mask[0] = 0            # a fully padded sample -> zeros
    mask[1] = 1            # no padding
    expected = np.zeros((5, 3))
    for i in range(5):
        kept = [a[i, t].astype(np.float64) for t in range(8) if mask[i, t]]
        if kept:
            expected[i] = np.sum(kept, axis=0) / len(kept)
    got = pool_features(a, mask)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got[1], a[1].astype(np.float64).mean(0))
    assert not np.allclose(got[2:], a[2:].mean(1))  # the mask matters
    np.testing.assert_allclose(pool_features(a, mask.astype(bool)), got)


def test_pool_errors():
    with pytest.raises(InputError):
        pool_features(np.ones((2, 3, 4, 4)), mask=np.ones((2, 3)))
    with pytest.raises(InputError):
        pool_features(np.ones((2, 3, 4)), mask=np.ones((2, 4)))
    with pytest.raises(InputError):
        pool_features(np.float32(1.0))


# ---------------------------------------------------------------- pca_cap

def test_pca_cap_reduces_width_from_x_only():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((100, 40)) @ rng.standard_normal((40, 300)) + 5.0
    Y = X + rng.standard_normal(X.shape)
    Xc, Yc = pca_cap(X, Y, max_dim=16)
    assert Xc.shape == (100, 16) and Yc.shape == (100, 16)
    # X's leading principal components: centred, uncorrelated, variances decreasing, top-16 energy
    np.testing.assert_allclose(Xc.mean(0), 0.0, atol=1e-8)
    cov = Xc.T @ Xc
    np.testing.assert_allclose(cov - np.diag(np.diag(cov)), 0.0, atol=1e-6 * cov.max())
    assert np.all(np.diff(np.diag(cov)) <= 1e-9)
    s = np.linalg.svd(X - X.mean(0), compute_uv=False)
    assert np.sum(Xc**2) == pytest.approx(np.sum(s[:16] ** 2), rel=1e-10)
    # Y is centred by X's mean and projected on the same axes: Y - X maps to (Y - X) @ axes
    axes = np.linalg.lstsq(X - X.mean(0), Xc, rcond=None)[0]
    np.testing.assert_allclose(Yc - Xc, (Y - X) @ axes, atol=1e-6)
    # the axes come from X alone
    Xc2, _ = pca_cap(X, rng.standard_normal(X.shape), max_dim=16)
    np.testing.assert_allclose(np.abs(Xc2), np.abs(Xc), atol=1e-8)


def test_pca_cap_keeps_cka_of_identical_at_zero_and_is_a_noop_when_small():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((50, 80))
    Xc, Yc = pca_cap(X, X.copy(), max_dim=10)
    assert Xc.shape[1] == 10
    assert score("cka", Xc, Yc) == pytest.approx(0.0, abs=1e-12)
    small = rng.standard_normal((50, 8)).astype(np.float32)
    a, b = pca_cap(small, small + 1, max_dim=8)
    assert a is small and b.dtype == np.float32
    wide = rng.standard_normal((20, 100))  # fewer samples than max_dim: as many axes as X has
    assert pca_cap(wide, wide, max_dim=64)[0].shape == (20, 20)


def test_pca_cap_different_widths_uses_own_axes():
    rng = np.random.default_rng(4)
    X, Y = rng.standard_normal((30, 50)), rng.standard_normal((30, 12))
    a, b = pca_cap(X, Y, max_dim=20)
    assert a.shape == (30, 20) and b is Y


# ---------------------------------------------------------------- make_conditions

def test_conditions_merge_rare_classes_and_respect_max():
    predicted = np.repeat([5, 3, 9, 1, 7, 2], [40, 30, 20, 10, 5, 3])
    feats = np.zeros((len(predicted), 2))
    ids = make_conditions(predicted, feats, max_conditions=10, min_count=8)
    assert ids.dtype.kind == "i" and ids.shape == predicted.shape
    # the four classes with >= 8 samples, by frequency, then one merged condition for classes 7 and 2
    for cls, cond in ((5, 0), (3, 1), (9, 2), (1, 3)):
        assert np.all(ids[predicted == cls] == cond)
    assert np.all(ids[np.isin(predicted, [7, 2])] == 4)
    assert ids.max() == 4
    capped = make_conditions(predicted, feats, max_conditions=3, min_count=8)
    assert set(np.unique(capped)) == {0, 1, 2}
    assert np.all(capped[predicted == 5] == 0) and np.all(capped[predicted == 3] == 1)
    assert np.all(capped[np.isin(predicted, [9, 1, 7, 2])] == 2)


def test_conditions_prefer_labels_and_break_ties_by_id():
    predicted = np.repeat([0, 1], 20)
    labels = np.repeat([4, 2, 3], [10, 10, 20])
    ids = make_conditions(predicted, np.zeros((40, 1)), labels=labels, max_conditions=10, min_count=8)
    np.testing.assert_array_equal(ids, np.repeat([2, 1, 0], [10, 10, 20]))  # 3 (20), then 2, 4 (tie)
    all_rare = make_conditions(np.arange(40) % 20, np.zeros((40, 1)), min_count=8)
    np.testing.assert_array_equal(all_rare, 0)


def test_conditions_kmeans_for_non_classifiers():
    rng = np.random.default_rng(5)
    centres = np.array([[0, 0, 0], [20, 0, 0], [0, 20, 0]], float)
    truth = np.repeat([0, 1, 2], 30)
    feats = centres[truth] + rng.standard_normal((90, 3))
    ids = make_conditions(None, feats, max_conditions=3, min_count=8, seed=1)
    assert ids.max() < 3
    for k in range(3):  # each true cluster lands in one condition
        assert len(np.unique(ids[truth == k])) == 1
    assert len(np.unique(ids)) == 3
    np.testing.assert_array_equal(ids, make_conditions(None, feats, max_conditions=3, min_count=8, seed=1))
    many = make_conditions(None, feats, max_conditions=10, min_count=8, seed=0)
    assert 1 <= len(np.unique(many)) <= 10
    np.testing.assert_array_equal(make_conditions(None, np.ones((40, 4))), 0)  # constant: one condition
    assert make_conditions(None, feats[:10], min_count=8).max() == 0           # too few samples to split
