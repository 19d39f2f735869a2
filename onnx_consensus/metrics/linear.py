"""Procrustes-based shape metrics (Williams et al. 2021): partial whitening, then the angle after the best
orthogonal alignment. ``linear_0`` is CCA-like (invariant to invertible linear maps), ``linear_1`` is
rotation-only. Also the small linear-algebra helpers the other alignment metrics share."""
from __future__ import annotations

import numpy as np

from .registry import register_metric

#: relative ridge for alpha = 0: the covariance gets + RIDGE * (mean feature variance) * I.
RIDGE = 1e-6


def centre(A: np.ndarray) -> np.ndarray:
    """Columns of A (n, d) minus their mean."""
    return A - A.mean(axis=0)


def polar(M: np.ndarray) -> np.ndarray:
    """Orthogonal polar factor U V^T of M (p, q) = U S V^T: the partial isometry maximising tr(T^T M)."""
    U, _, Vt = np.linalg.svd(M, full_matrices=False)
    return U @ Vt


def angle(inner: float, norm_x: float, norm_y: float, *, degenerate: float) -> float:
    """arccos(inner / (norm_x * norm_y)), cosine clipped into [-1, 1]. When a norm is 0: 0.0 if both
    are, ``degenerate`` (the metric's maximal value) if only one is."""
    if norm_x == 0.0 or norm_y == 0.0:
        return 0.0 if norm_x == norm_y else float(degenerate)
    return float(np.arccos(np.clip(inner / (norm_x * norm_y), -1.0, 1.0)))


def whitened_factors(X: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Partial whitening X~ = Xc (alpha I + (1 - alpha) Cov_X)^{-1/2}, returned in factored form (U, w)
    with X~ = U diag(w) V^T (U: (n, r) orthonormal, w: (r,), V dropped: it is orthogonal and the
    Procrustes angle does not depend on it). Cov_X = Xc^T Xc / n. For alpha = 0 the covariance gets a
    ridge RIDGE * tr(Cov_X)/d so singular covariances work (see ``linear_score``). Works from the thin
    SVD of Xc, so the cost is O(n d min(n, d)) whichever of n, d is larger. An all-constant X gives
    r = 0."""
    Xc = centre(X)
    n, d = Xc.shape
    U, s, _ = np.linalg.svd(Xc, full_matrices=False)
    keep = s > s[0] * max(n, d) * np.finfo(float).eps if s.size and s[0] > 0 else np.zeros(s.size, bool)
    U, s = U[:, keep], s[keep]
    var = s**2 / n
    ridge = RIDGE * var.sum() / d if alpha == 0 else 0.0
    return U, s / np.sqrt(alpha + (1.0 - alpha) * var + ridge)


def linear_shape_distance(X: np.ndarray, Y: np.ndarray, alpha: float) -> float:
    """Angular Procrustes distance between the partially whitened X (n, dx) and Y (n, dy), float64, in
    [0, pi/2]: arccos(max_Q <X~, Y~ Q>_F / (||X~|| ||Y~||)) over (partial) orthogonal Q, i.e. the nuclear
    norm of X~^T Y~ over the norms. pi/2 when exactly one side is constant, 0 when both are."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must be in [0, 1]")
    Ux, wx = whitened_factors(X, alpha)
    Uy, wy = whitened_factors(Y, alpha)
    if wx.size == 0 or wy.size == 0:
        return angle(0.0, float(wx.size), float(wy.size), degenerate=np.pi / 2)
    core = (wx[:, None] * (Ux.T @ Uy)) * wy[None, :]
    nuclear = np.linalg.svd(core, compute_uv=False).sum()
    return angle(nuclear, np.linalg.norm(wx), np.linalg.norm(wy), degenerate=np.pi / 2)


@register_metric("linear_0", alignment=True)
def linear_0(X: np.ndarray, Y: np.ndarray, labels=None, *, seed: int = 0) -> float:
    """CCA-like shape metric (alpha = 0): angle after full whitening and orthogonal alignment.

    Whitening uses (Cov + RIDGE * tr(Cov)/d * I)^{-1/2}, RIDGE = 1e-6, so that singular covariances
    (n < d, duplicated columns) give finite values. The ridge scales with the data, so scaling stays an
    exact invariance; for Y = X A with A invertible the score is 0 up to O(ridge / lambda_min), lambda_min
    the smallest covariance eigenvalue relative to the mean one, which is negligible when n >> d and
    the covariance is well conditioned."""
    return linear_shape_distance(X, Y, 0.0)


@register_metric("linear_1", alignment=True)
def linear_1(X: np.ndarray, Y: np.ndarray, labels=None, *, seed: int = 0) -> float:
    """Rotation-only shape metric (alpha = 1): angle between centred X and Y after orthogonal Procrustes."""
    return linear_shape_distance(X, Y, 1.0)
