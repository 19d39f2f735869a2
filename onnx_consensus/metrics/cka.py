"""Linear CKA (centred kernel alignment); the score is 1 - CKA."""
from __future__ import annotations

import numpy as np

from .registry import register_metric


def _centred_unit(A: np.ndarray) -> np.ndarray | None:
    """Columns centred, then scaled to unit Frobenius norm; None when every column is constant."""
    Ac = A - A.mean(axis=0)
    norm = np.linalg.norm(Ac)
    return None if norm == 0.0 else Ac / norm


def linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear CKA of X (n, dx) and Y (n, dy), float64: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F).

    Uses the (d x d) cross-products when dx + dy <= n (cost ~ n (dx + dy)^2), the (n x n) Gram matrices
    otherwise (cost ~ n^2 (dx + dy)). Constant representations: 1.0 if both are constant, 0.0 if only one is."""
    Xc, Yc = _centred_unit(X), _centred_unit(Y)
    if Xc is None or Yc is None:
        return 1.0 if Xc is None and Yc is None else 0.0
    n, dx = Xc.shape
    dy = Yc.shape[1]
    if (dx + dy) <= n:
        xy = np.linalg.norm(Xc.T @ Yc) ** 2
        xx = np.linalg.norm(Xc.T @ Xc)
        yy = np.linalg.norm(Yc.T @ Yc)
    else:  # ||A^T B||_F^2 = <A A^T, B B^T>_F
        K, L = Xc @ Xc.T, Yc @ Yc.T
        xy, xx, yy = np.vdot(K, L), np.linalg.norm(K), np.linalg.norm(L)
    denom = xx * yy
    return float(np.clip(xy / denom, 0.0, 1.0)) if denom > 0 else 0.0


@register_metric("cka", alignment=False)
def cka_score(X: np.ndarray, Y: np.ndarray, labels=None, *, seed: int = 0) -> float:
    """1 - linear CKA; invariant to orthogonal maps, isotropic scaling and translation (in [0, 1])."""
    return 1.0 - linear_cka(X, Y)
