"""Permutation shape metric: the angle between centred X and Y after the best matching of their units."""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from .linear import angle, centre
from .registry import register_metric


def pad_columns(A: np.ndarray, d: int) -> np.ndarray:
    """A (n, k) with zero columns appended up to (n, d); A itself when k == d."""
    return A if A.shape[1] == d else np.hstack([A, np.zeros((A.shape[0], d - A.shape[1]))])


@register_metric("permutation", alignment=True)
def permutation_score(X: np.ndarray, Y: np.ndarray, labels=None, *, seed: int = 0) -> float:
    """arccos(<Xc, Yc P>_F / (||Xc|| ||Yc||)) for the column permutation P maximising tr(Xc^T Yc P).

    X (n, dx), Y (n, dy), float64; the narrower side gets zero columns. Invariant to permuting units,
    isotropic scaling and translation, not to rotations. In [0, pi]; pi when exactly one side is
    constant (no unit can be matched), 0 when both are."""
    d = max(X.shape[1], Y.shape[1])
    Xc, Yc = pad_columns(centre(X), d), pad_columns(centre(Y), d)
    nx, ny = np.linalg.norm(Xc), np.linalg.norm(Yc)
    if nx == 0.0 or ny == 0.0:
        return angle(0.0, nx, ny, degenerate=np.pi)
    gain = (Xc / nx).T @ (Yc / ny)  # (d, d): gain[i, j] = <x_i, y_j>, normalised
    rows, cols = linear_sum_assignment(gain, maximize=True)
    return angle(float(gain[rows, cols].sum()), 1.0, 1.0, degenerate=np.pi)
