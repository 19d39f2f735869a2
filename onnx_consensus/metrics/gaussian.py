"""Gaussian stochastic shape metrics (Duong et al. 2023): each condition is summarised by the mean and
covariance of each representation, and the two sets of Gaussians are compared after the best common
orthogonal alignment, with a weight alpha in [0, 2] between means and covariances:

    d_alpha^2 = min_T mean_k [ alpha ||mu_xk - T mu_yk||^2 + (2 - alpha) Bures^2(S_xk, T S_yk T^T) ],

alpha = 0: covariances only, 1: 2-Wasserstein between the Gaussians, 2: means only.
Bures^2(A, B) = tr A + tr B - 2 ||A^1/2 B^1/2||_* (the nuclear norm form of tr (A^1/2 B A^1/2)^1/2).

Algorithm (block-coordinate / majorise-minimise, monotone): with T fixed, each nuclear norm is
linearised by the polar factor W_k of S_xk^1/2 T S_yk^1/2 (the optimal rotation inside the Bures term),
and T is updated by one Procrustes (polar) step on sum_k [alpha mu_xk mu_yk^T + (2 - alpha)
S_xk^1/2 W_k S_yk^1/2]. The objective is non-convex, so the start matters: the Procrustes of the class
means (netrep's start; exact for alpha = 2) is compared with the Procrustes of the paired samples X, Y
(exact for Y = X Q; with few conditions the means leave most of T undetermined), and the descent runs
from the one with the lower objective. It stops when a step gains less than TOL (relative to the
objective's scale) or after MAX_ITER steps. Related representations converge in tens of steps; for
unrelated ones the descent is slow and the capped result is an upper bound on the limit (in checks on
independent random data, 5-25% above it in the objective).

Efficiency: every mean and covariance of X lies in the row space of X, so when n < d the problem is
solved in the coordinates of the two row spaces (zero-padded to a common width m <= n; exact, as the
best T only ever needs to map one span into the other), and each covariance is kept as a thin
square-root factor F_k = P_k D_k (m, r_k), S_k^1/2 = P_k D_k P_k^T, so a step costs one m x m SVD plus
O(m^2 n) products.
"""
from __future__ import annotations

import hashlib
import threading

import numpy as np

from .linear import polar
from .permutation import pad_columns
from .registry import register_metric

#: ridge added to each covariance eigenvalue on the covariance's support (see ``condition_stats``).
RIDGE = 1e-6
#: stop when one step lowers the objective by less than TOL times its scale (sum of all traces and
#: squared means, divided by the number of conditions), or after MAX_ITER steps.
TOL = 1e-8
MAX_ITER = 100


def row_space_coords(A: np.ndarray) -> np.ndarray:
    """Coordinates (n, r) of the rows of A (n, d) in an orthonormal basis of its row space, r = rank(A),
    when n < d (distances between rows, means, covariances and inner products are kept); A itself
    otherwise."""
    n, d = A.shape
    if n >= d:
        return A
    U, s, _ = np.linalg.svd(A, full_matrices=False)
    keep = s > s[0] * d * np.finfo(float).eps if s[0] > 0 else np.zeros(s.size, bool)
    return U[:, keep] * s[keep]


def condition_stats(A: np.ndarray, groups: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Per condition k (rows ``groups[k]`` of A (n, m)): the mean (K, m), a square-root factor
    F_k (m, r_k) of the covariance and its trace (K,).

    Covariance S_k = Z^T Z / n_k with Z the centred rows (maximum likelihood; one sample gives S_k = 0).
    F_k = P_k diag(sqrt(lambda + RIDGE)) for the eigenpairs (lambda, P_k) of S_k on its support
    (lambda above rounding level), so S_k^1/2 = F_k P_k^T and the ridge +1e-6 I acts on the support
    only: directions where a covariance is exactly zero stay zero. When S_k is full rank this is exactly
    S_k + 1e-6 I; otherwise it differs from a full ridge by at most 2 sqrt(1e-6 m) in Bures distance."""
    means, factors, traces = [], [], []
    for rows in groups:
        Ak = A[rows]
        mu = Ak.mean(axis=0)
        _, s, Vt = np.linalg.svd(Ak - mu, full_matrices=False)
        keep = s > s[0] * max(Ak.shape) * np.finfo(float).eps if s.size and s[0] > 0 else np.zeros(s.size, bool)
        lam = s[keep] ** 2 / len(rows) + RIDGE
        means.append(mu)
        factors.append(Vt[keep].T * np.sqrt(lam))
        traces.append(lam.sum())
    return np.array(means), factors, np.array(traces)


def fit_alignment(X: np.ndarray, Y: np.ndarray, labels: np.ndarray | None, alpha: float, *,
                  tol: float = TOL, max_iter: int = MAX_ITER) -> tuple[float, np.ndarray, int]:
    """Minimise the alpha-objective over orthogonal T. X (n, dx), Y (n, dy) float64; labels (n,) or None
    (one condition). Returns (objective, T (m, m) in the internal coordinates, steps taken)."""
    if not 0.0 <= alpha <= 2.0:
        raise ValueError("alpha must be in [0, 2]")
    Xr, Mx, Fx, tx = _side_stats(X, labels)
    Yr, My, Fy, ty = _side_stats(Y, labels)
    m = max(Xr.shape[1], Yr.shape[1], 1)
    Xr, Yr, Mx, My = pad_columns(Xr, m), pad_columns(Yr, m), pad_columns(Mx, m), pad_columns(My, m)
    Fx = [_pad_rows(f, m) for f in Fx]
    Fy = [_pad_rows(f, m) for f in Fy]
    K, beta = len(Fx), 2.0 - alpha
    scale = alpha * (np.sum(Mx**2) + np.sum(My**2)) + beta * (tx.sum() + ty.sum())
    step = _Step(Mx, My, Fx, Fy, alpha, scale)
    # two starts, the Procrustes of the means and of the paired samples; descend from the better one
    starts = [(T,) + step(T) for T in (polar(Mx.T @ My), polar(Xr.T @ Yr))]
    T, obj, grad = min(starts, key=lambda s: s[1])
    steps = 0
    while steps < max_iter:
        T_new = polar(grad)
        obj_new, grad = step(T_new)
        steps += 1
        if obj_new < obj:
            improvement = obj - obj_new
            T, obj = T_new, obj_new
            if improvement <= tol * scale / K:
                break
        else:  # no progress (rounding level): stop at the best point
            break
    return max(float(obj), 0.0), T, steps


def _pad_rows(F: np.ndarray, m: int) -> np.ndarray:
    return F if F.shape[0] == m else np.vstack([F, np.zeros((m - F.shape[0], F.shape[1]))])


_STATS_CACHE: dict[bytes, tuple] = {}
_STATS_CACHE_SIZE = 8
_STATS_LOCK = threading.Lock()


def _side_stats(A: np.ndarray, labels: np.ndarray | None) -> tuple:
    """(row-space coordinates, means, covariance factors, traces) of one side, memoised by content:
    the three gaussian metrics share them, and in the global scope every candidate shares the original
    model's side. Zero-padding to a common width afterwards commutes with these statistics."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(A.shape).encode())
    h.update(np.ascontiguousarray(A).tobytes())
    if labels is not None:
        h.update(np.ascontiguousarray(labels).tobytes())
    key = h.digest()
    stats = _STATS_CACHE.get(key)
    if stats is None:
        Ar = row_space_coords(A)
        if labels is None:
            groups = [np.arange(A.shape[0])]
        else:
            _, inverse = np.unique(labels, return_inverse=True)
            groups = [np.flatnonzero(inverse == k) for k in range(inverse.max() + 1)]
        stats = (Ar,) + condition_stats(Ar, groups)
        with _STATS_LOCK:  # candidates may be scored in threads (``scoring.score_table``)
            while len(_STATS_CACHE) >= _STATS_CACHE_SIZE:
                _STATS_CACHE.pop(next(iter(_STATS_CACHE)))
            _STATS_CACHE[key] = stats
    return stats


class _Step:
    """Objective and its linearisation at T: ``__call__(T) -> (objective, G)`` where the next T is
    polar(G). objective = (scale - 2 cross(T)) / K, with cross(T) = alpha sum_k <mu_xk, T mu_yk> +
    (2 - alpha) sum_k ||F_xk^T T F_yk||_*, and G = alpha M_x^T M_y + (2 - alpha) sum_k F_xk W_k F_yk^T,
    W_k the polar factor of F_xk^T T F_yk."""

    def __init__(self, Mx, My, Fx, Fy, alpha, scale):
        self.Mx, self.My, self.Fx, self.alpha, self.beta = Mx, My, Fx, alpha, 2.0 - alpha
        m = Mx.shape[1]
        self.Fy_all = np.hstack(Fy) if self.beta > 0 and Fy else np.zeros((m, 0))
        self.offsets = np.cumsum([0] + [f.shape[1] for f in Fy])
        self.mean_grad = alpha * (Mx.T @ My)
        self.scale = scale
        self.K = len(Fx)

    def __call__(self, T: np.ndarray) -> tuple[float, np.ndarray]:
        cross = self.alpha * np.sum(self.Mx * (self.My @ T.T))  # sum_k <mu_xk, T mu_yk>
        grad = self.mean_grad
        if self.beta > 0 and self.Fy_all.shape[1]:
            TFy = T @ self.Fy_all
            left = []
            for k, fx in enumerate(self.Fx):
                tfy = TFy[:, self.offsets[k]:self.offsets[k + 1]]
                if fx.shape[1] == 0 or tfy.shape[1] == 0:
                    left.append(np.zeros_like(tfy))
                    continue
                u, s, vt = np.linalg.svd(fx.T @ tfy, full_matrices=False)  # ||S_x^1/2 T S_y^1/2||_* = sum s
                cross += self.beta * s.sum()
                left.append(fx @ (u @ vt))
            grad = grad + self.beta * (np.hstack(left) @ self.Fy_all.T)
        return (self.scale - 2.0 * cross) / self.K, grad


def gaussian_distance(X: np.ndarray, Y: np.ndarray, labels: np.ndarray | None, alpha: float) -> float:
    """sqrt of the minimised alpha-objective (tiny negative rounding clipped to 0), >= 0."""
    return float(np.sqrt(fit_alignment(X, Y, labels, alpha)[0]))


def _make(alpha: int):
    what = ("covariances only", "2-Wasserstein between Gaussians", "means only")[alpha]
    doc = (f"Gaussian stochastic shape metric, alpha = {alpha} ({what}); per-condition Gaussians from "
           "``labels`` (one condition when None); invariant to orthogonal maps of either side.")

    def metric(X: np.ndarray, Y: np.ndarray, labels=None, *, seed: int = 0) -> float:
        return gaussian_distance(X, Y, labels, float(alpha))

    metric.__name__ = metric.__qualname__ = f"gaussian_stochastic_{alpha}"
    metric.__doc__ = doc
    return register_metric(f"gaussian_stochastic_{alpha}", alignment=True, description=doc)(metric)


gaussian_stochastic_0, gaussian_stochastic_1, gaussian_stochastic_2 = (_make(a) for a in (0, 1, 2))
