"""Tests of onnx_consensus.metrics: exact values, invariances, non-invariances, sensitivity, robustness."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from onnx_consensus.errors import InputError
from onnx_consensus.metrics import DEFAULT_METRICS, available_metrics, get_metric, register_metric, score
from onnx_consensus.metrics import registry


BUILTIN = ("cka", "gaussian_stochastic_0", "gaussian_stochastic_1", "gaussian_stochastic_2", "permutation",
           "linear_0", "linear_1", "wasserstein", "cosine", "angular", "random")
SIMILARITY = tuple(m for m in BUILTIN if m != "random")
GAUSSIAN = ("gaussian_stochastic_0", "gaussian_stochastic_1", "gaussian_stochastic_2")




def rot(d, rng):
    """A random (d, d) orthogonal matrix."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def clustered(n=240, d=6, k=3, seed=0):
    """(X, labels): k separated Gaussian clusters with correlated, anisotropic within-class noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    X = 3.0 * rng.standard_normal((k, d))[labels] + rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    return X, labels


# ---------------------------------------------------------------- registry

def test_builtins_registered_with_flags():
    assert set(BUILTIN) <= set(available_metrics())
    assert set(DEFAULT_METRICS) <= set(available_metrics()) and len(DEFAULT_METRICS) == 8
    for name in BUILTIN:
        spec = get_metric(name)
        assert spec.name == name and callable(spec.fn) and spec.description
        assert spec.alignment == (name.startswith(("gaussian", "linear")) or name == "permutation")
    with pytest.raises(Exception):
        get_metric("cka").alignment = False  # frozen


def test_register_new_metric_is_found_by_score():
    name = "test_mean_abs_diff"
    try:
        @register_metric(name, alignment=False)
        def mean_abs_diff(X, Y, labels=None, *, seed=0):
            """Mean absolute difference."""
            return float(np.abs(X - Y).mean())

        assert name in available_metrics()
        assert get_metric(name).description == "Mean absolute difference."
        X = np.zeros((4, 3), np.float32)
        assert score(name, X, X + 2) == pytest.approx(2.0)
        with pytest.raises(ValueError):
            register_metric(name)(mean_abs_diff)
    finally:
        registry._REGISTRY.pop(name, None)


def test_unknown_metric_lists_names():
    with pytest.raises(InputError) as err:
        score("no_such_metric", np.ones((3, 2)), np.ones((3, 2)))
    for name in ("cka", "wasserstein", "linear_0"):
        assert name in str(err.value)


# ---------------------------------------------------------------- input validation

@pytest.mark.parametrize("X, Y", [
    (np.ones((5, 3)), np.ones((6, 3))),                      # different n
    (np.ones(5), np.ones(5)),                                 # 1-D
    (np.ones((5, 3, 2)), np.ones((5, 3, 2))),                 # 3-D
    (np.ones((1, 3)), np.ones((1, 3))),                       # n < 2
    (np.array([[1.0, np.nan], [0.0, 1.0]]), np.ones((2, 2))),
    (np.ones((2, 2)), np.array([[1.0, np.inf], [0.0, 1.0]])),
    (np.ones((3, 0)), np.ones((3, 0))),                       # no features
])
def test_input_errors(X, Y):
    for name in ("cka", "gaussian_stochastic_1", "cosine"):
        with pytest.raises(InputError):
            score(name, X, Y)


def test_label_errors_and_width_mismatch_for_per_sample_metrics():
    X = np.random.default_rng(0).standard_normal((10, 3))
    with pytest.raises(InputError):
        score("gaussian_stochastic_1", X, X, labels=np.zeros(9, int))
    with pytest.raises(InputError):
        score("gaussian_stochastic_1", X, X, labels=np.full(10, 0.5))
    with pytest.raises(InputError):
        score("cosine", X, X[:, :2])


def test_float16_inf_is_rejected():
    X = np.array([[1.0, np.inf], [2.0, 3.0]], dtype=np.float16)
    with pytest.raises(InputError):
        score("cka", X, X)


# ---------------------------------------------------------------- CKA

def hsic(K, L):
    n = K.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    return np.trace(K @ H @ L @ H) / (n - 1) ** 2


@pytest.mark.parametrize("n, d", [(60, 5), (12, 40)])  # both branches: d x d products and n x n Grams
def test_cka_equals_hsic_formula(n, d):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((n, d)) + 3.0
    Y = X @ rng.standard_normal((d, d + 1)) + rng.standard_normal((n, d + 1))
    K, L = X @ X.T, Y @ Y.T
    cka = hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))
    assert score("cka", X, Y) == pytest.approx(1.0 - cka, abs=1e-12)
    assert 0.05 < 1.0 - cka < 1.0  # the data is neither identical nor unrelated


def test_cka_invariances():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((50, 7))
    for Y in (X @ rot(7, rng), 3.7 * X, X + 5.0, -X):
        assert score("cka", X, Y) == pytest.approx(0.0, abs=1e-12)


def test_cka_not_invariant_to_ill_conditioned_map():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((200, 6))
    A = rot(6, rng) @ np.diag(np.logspace(0, 3, 6)) @ rot(6, rng)
    assert score("cka", X, X @ A) > 0.2


# ---------------------------------------------------------------- Procrustes and permutation shape metrics

def test_linear_1_and_permutation_invariances():
    rng = np.random.default_rng(4)
    X = rng.standard_normal((80, 6))
    perm = rng.permutation(6)
    assert score("linear_1", X, X @ rot(6, rng) + 2.0) == pytest.approx(0.0, abs=1e-6)
    assert score("linear_1", X, 4.0 * X) == pytest.approx(0.0, abs=1e-6)
    assert score("permutation", X, 2.5 * X[:, perm] - 1.0) == pytest.approx(0.0, abs=1e-6)
    # not invariant to rotations, nor (linear_1) to general linear maps
    assert score("permutation", X, X @ rot(6, rng)) > 0.3
    assert score("linear_1", X, X @ np.diag(np.logspace(0, 2, 6))) > 0.2


def test_linear_0_invariant_to_invertible_map_when_n_much_larger_than_d():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((3000, 8))
    A = rng.standard_normal((8, 8))  # invertible almost surely, not orthogonal
    assert np.linalg.cond(A) < 1e3
    assert score("linear_0", X, X @ A - 1.0) == pytest.approx(0.0, abs=1e-3)
    assert score("linear_1", X, X @ A) > 0.1  # the rotation-only metric sees the same map


def test_linear_value_matches_explicit_whitening_and_procrustes():
    rng = np.random.default_rng(6)
    X, Y = rng.standard_normal((40, 4)), rng.standard_normal((40, 3))
    for alpha, name in ((0.0, "linear_0"), (1.0, "linear_1")):
        def whiten(A):
            Ac = A - A.mean(0)
            C = Ac.T @ Ac / len(A)
            ridge = 1e-6 * np.trace(C) / A.shape[1] if alpha == 0 else 0.0
            return Ac @ scipy.linalg.fractional_matrix_power(alpha * np.eye(len(C)) + (1 - alpha) * C
                                                             + ridge * np.eye(len(C)), -0.5)
        Xw, Yw = whiten(X), whiten(Y)
        u, _, vt = np.linalg.svd(Yw.T @ Xw, full_matrices=False)
        Q = u @ vt  # (3, 4) partial isometry maximising <Xw, Yw Q>
        expected = np.arccos(np.sum(Xw * (Yw @ Q)) / (np.linalg.norm(Xw) * np.linalg.norm(Yw)))
        assert score(name, X, Y) == pytest.approx(expected, abs=1e-8)


def test_permutation_value_matches_brute_force():
    import itertools

    rng = np.random.default_rng(7)
    X, Y = rng.standard_normal((20, 4)), rng.standard_normal((20, 4))
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    best = max(np.sum(Xc * Yc[:, list(p)]) for p in itertools.permutations(range(4)))
    expected = np.arccos(best / (np.linalg.norm(Xc) * np.linalg.norm(Yc)))
    assert score("permutation", X, Y) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- gaussian stochastic metrics

@pytest.mark.parametrize("name", GAUSSIAN)
@pytest.mark.parametrize("use_labels", [True, False])
def test_gaussian_zero_for_identical_and_rotated(name, use_labels):
    rng = np.random.default_rng(8)
    X, labels = clustered()
    lab = labels if use_labels else None
    assert score(name, X, X, lab) == pytest.approx(0.0, abs=1e-6)
    assert score(name, X, X @ rot(X.shape[1], rng), lab) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("n, d", [(240, 6), (30, 50)])  # n < d exercises the row-space reduction
def test_gaussian_2_equals_procrustes_of_class_means(n, d):
    rng = np.random.default_rng(9)
    X, labels = clustered(n, d, k=4, seed=9)
    Y = np.tanh(X @ rng.standard_normal((d, d)) / np.sqrt(d)) + 0.1 * rng.standard_normal((n, d))
    K = 4
    Mx = np.array([X[labels == k].mean(0) for k in range(K)])
    My = np.array([Y[labels == k].mean(0) for k in range(K)])
    u, _, vt = np.linalg.svd(My.T @ Mx)
    T = u @ vt  # argmin_T ||Mx - My T||_F over orthogonal T
    expected = np.sqrt(2.0 / K * np.linalg.norm(Mx - My @ T) ** 2)
    assert score("gaussian_stochastic_2", X, Y, labels) == pytest.approx(expected, rel=1e-7)
    assert expected > 0.1


def _bures_sq(A, B):
    ra = scipy.linalg.sqrtm(A).real
    return np.trace(A) + np.trace(B) - 2 * np.trace(scipy.linalg.sqrtm(ra @ B @ ra).real)


@pytest.mark.parametrize("alpha", [0, 1])
def test_gaussian_matches_brute_force_over_o2(alpha):
    """In d = 2 the orthogonal group is rotations and reflections by one angle: minimise on a fine grid."""
    rng = np.random.default_rng(10 + alpha)
    X, labels = clustered(300, 2, k=3, seed=10 + alpha)
    Y = X @ np.array([[1.0, 0.6], [-0.2, 0.7]]) + 0.3 * rng.standard_normal(X.shape) + 0.5
    stats = []
    for k in range(3):
        a, b = X[labels == k], Y[labels == k]
        stats.append((a.mean(0), b.mean(0), np.cov(a.T, bias=True) + 1e-6 * np.eye(2),
                      np.cov(b.T, bias=True) + 1e-6 * np.eye(2)))

    def objective(T):
        return np.mean([alpha * np.sum((mx - T @ my) ** 2) + (2 - alpha) * _bures_sq(sx, T @ sy @ T.T)
                        for mx, my, sx, sy in stats])

    best = np.inf
    for theta in np.linspace(0, 2 * np.pi, 721):
        c, s = np.cos(theta), np.sin(theta)
        for T in (np.array([[c, -s], [s, c]]), np.array([[c, s], [s, -c]])):
            best = min(best, objective(T))
    got = score(f"gaussian_stochastic_{alpha}", X, Y, labels)
    assert got ** 2 <= best + 1e-9  # at least as good as the grid
    assert got == pytest.approx(np.sqrt(best), rel=1e-3)  # and the grid is within 0.5 degrees of optimal


@pytest.mark.parametrize("name", GAUSSIAN)
def test_gaussian_unchanged_by_zero_padding_and_rotation_when_n_less_than_d(name):
    """Span reduction: appending zero features and rotating either side (n < d) leaves the score as is."""
    rng = np.random.default_rng(11)
    X, labels = clustered(30, 8, k=3, seed=11)
    Y = X @ rng.standard_normal((8, 8)) * 0.5 + rng.standard_normal((30, 8))
    ref = score(name, X, Y, labels)
    Xp, Yp = np.hstack([X, np.zeros((30, 52))]), np.hstack([Y, np.zeros((30, 52))])
    assert ref > 0.1
    assert score(name, Xp @ rot(60, rng), Yp @ rot(60, rng), labels) == pytest.approx(ref, rel=1e-6, abs=1e-9)


def test_gaussian_large_d_runs_and_is_finite():
    """d = 2048 > n = 512, K = 10: the row-space reduction keeps this at seconds (no timing assertion)."""
    rng = np.random.default_rng(12)
    n, d, K = 512, 2048, 10
    labels = rng.integers(0, K, n)
    X = rng.standard_normal((K, d))[labels] * 0.5 + rng.standard_normal((n, 64)) @ rng.standard_normal((64, d)) * 0.2
    X = (X + 0.1 * rng.standard_normal((n, d))).astype(np.float32)
    Y = X + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    for name in GAUSSIAN:
        value = score(name, X, Y, labels)
        assert np.isfinite(value) and value > 0


# ---------------------------------------------------------------- wasserstein, baselines

def test_wasserstein_matches_scipy():
    rng = np.random.default_rng(13)
    X, Y = rng.standard_normal((30, 4)), 0.3 * rng.standard_normal((30, 6)) + 0.1  # crossing CDFs
    expected = scipy.stats.wasserstein_distance(X.ravel(), Y.ravel())
    assert score("wasserstein", X, Y) == pytest.approx(expected, rel=1e-12)
    assert expected > 1.5 * abs(X.mean() - Y.mean())  # not just the difference of the means


def test_cosine_and_angular_values():
    X = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    Y = np.array([[0.0, 3.0], [0.0, 1.0], [-1.0, -1.0]])  # cos = 0, 1, -1
    assert score("cosine", X, Y) == pytest.approx(1.0 - 0.0 / 3)
    assert score("angular", X, Y) == pytest.approx((0.5 + 0.0 + 1.0) / 3)


def test_random_baseline_is_reproducible_and_candidate_dependent():
    rng = np.random.default_rng(14)
    X, Y1, Y2 = (rng.standard_normal((10, 3)) for _ in range(3))
    a = score("random", X, Y1, seed=3)
    # the documented closed form: uniform in [0, 1) from default_rng([seed, crc32 of Y as float64 bytes])
    assert a == np.random.default_rng([3, zlib.crc32(Y1.astype(np.float64).tobytes())]).random()
    many = [score("random", X, rng.standard_normal((10, 3)), seed=3) for _ in range(200)]
    assert scipy.stats.kstest(many, "uniform").pvalue > 1e-3  # uniform over candidates
    assert a == score("random", X, Y1, seed=3) == score("random", X + 1, Y1, seed=3)
    assert a != score("random", X, Y2, seed=3)
    assert a != score("random", X, Y1, seed=4)


# ---------------------------------------------------------------- sensitivity (every metric but random)

@pytest.mark.parametrize("name", SIMILARITY)
def test_identical_lower_than_independent(name):
    X, labels = clustered(200, 6, k=4, seed=15)
    rng = np.random.default_rng(15)
    Z = 1.5 * rng.standard_normal((200, 6)) + 0.5  # unrelated to X, other value distribution too
    same, indep = score(name, X, X, labels), score(name, X, Z, labels)
    assert same < 1e-6
    assert indep > 0.05 and indep > 100 * max(same, 1e-9)


@pytest.mark.parametrize("name", SIMILARITY)
def test_scores_rise_with_noise(name):
    X, labels = clustered(200, 6, k=4, seed=16)
    E = np.random.default_rng(16).standard_normal(X.shape)
    values = [score(name, X, X + s * E, labels) for s in (0.0, 0.1, 0.5, 2.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values


# ---------------------------------------------------------------- robustness

def _degenerate_cases():
    rng = np.random.default_rng(17)
    X = rng.standard_normal((20, 5))
    const = np.full((20, 5), 3.0)
    col = X.copy()
    col[:, 2] = 1.0
    dup = np.hstack([X, X[:, :2]])
    wide = rng.standard_normal((6, 40))
    return {
        "constant_vs_data": (const, X),
        "data_vs_constant": (X, const),
        "both_constant": (const, const + 1.0),
        "constant_column": (col, X),
        "duplicated_columns": (dup, np.hstack([X, X[:, 3:]])),
        "n_less_than_d": (wide, wide + 0.1 * rng.standard_normal(wide.shape)),
        "float16": (X.astype(np.float16), (X + 0.1).astype(np.float16)),
        "huge_values": (1e150 * X, 1e150 * (X + 0.1)),
    }


@pytest.mark.parametrize("case", list(_degenerate_cases()))
@pytest.mark.parametrize("name", BUILTIN)
def test_finite_on_degenerate_inputs(name, case):
    X, Y = _degenerate_cases()[case]
    labels = np.arange(len(X)) % 2
    value = score(name, X, Y, labels)
    assert np.isfinite(value) and value >= 0


@pytest.mark.parametrize("name, both, one", [("cka", 0.0, 1.0), ("linear_0", 0.0, np.pi / 2),
                                             ("linear_1", 0.0, np.pi / 2), ("permutation", 0.0, np.pi)])
def test_constant_representation_convention(name, both, one):
    rng = np.random.default_rng(18)
    X, C = rng.standard_normal((10, 3)), np.full((10, 3), 2.0)
    assert score(name, C, C - 1.0) == both
    assert score(name, X, C) == pytest.approx(one) and score(name, C, X) == pytest.approx(one)


@settings(max_examples=25, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(2, 6), st.integers(1, 4)),
              elements=st.floats(-1e3, 1e3, allow_nan=False, width=32)))
def test_every_metric_finite_on_arbitrary_small_inputs(X):
    Y = X[::-1].copy()
    for name in BUILTIN:
        assert np.isfinite(score(name, X, Y))
