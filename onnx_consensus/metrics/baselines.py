"""Baselines: per-sample cosine (ShortGPT's Block Influence), per-sample angle, and a seeded random score."""
from __future__ import annotations

import zlib

import numpy as np

from ..errors import InputError
from .registry import register_metric


ROW_CHUNK = 256
"""Rows computed at a time: the temporaries are (ROW_CHUNK, d), not (n, d) (4096 token rows of a 2048-wide model:
four 67 MB float64 copies otherwise)."""


def _row_cosines(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """(n,) cosine between rows X_i and Y_i; 1 when both rows are zero, 0 when only one is."""
    if X.shape != Y.shape:
        raise InputError(f"per-sample metrics need X and Y of the same shape, got {X.shape} and {Y.shape}")
    if X.size == 0:
        return np.ones(X.shape[0])
    scale = max(X.max(), -X.min(), Y.max(), -Y.min())  # avoids overflow of the squares for huge values
    if scale == 0.0:
        return np.ones(X.shape[0])
    cos = np.zeros(X.shape[0])
    for lo in range(0, X.shape[0], ROW_CHUNK):
        Xs, Ys = X[lo:lo + ROW_CHUNK] / scale, Y[lo:lo + ROW_CHUNK] / scale
        nx, ny = np.linalg.norm(Xs, axis=1), np.linalg.norm(Ys, axis=1)
        denom = nx * ny
        c = np.divide(np.einsum("ij,ij->i", Xs, Ys), denom, out=np.zeros_like(denom), where=denom > 0)
        c[(nx == 0) & (ny == 0)] = 1.0
        cos[lo:lo + ROW_CHUNK] = c
    return np.clip(cos, -1.0, 1.0)


@register_metric("cosine", alignment=False)
def cosine_score(X: np.ndarray, Y: np.ndarray, labels=None, *, seed: int = 0) -> float:
    """1 - mean_i cos(X_i, Y_i) (Block Influence; needs equal widths). In [0, 2]; not centred."""
    return float(1.0 - _row_cosines(X, Y).mean())


@register_metric("angular", alignment=False)
def angular_score(X: np.ndarray, Y: np.ndarray, labels=None, *, seed: int = 0) -> float:
    """mean_i arccos(cos(X_i, Y_i)) / pi (needs equal widths). In [0, 1]; not centred."""
    return float(np.mean(np.arccos(_row_cosines(X, Y))) / np.pi)


@register_metric("random", alignment=False)
def random_score(X: np.ndarray, Y: np.ndarray, labels=None, *, seed: int = 0) -> float:
    """Uniform in [0, 1) from default_rng([seed, crc32(Y.tobytes())]): a control ranking, reproducible,
    different for different candidates. Y is hashed as the float64 array ``score`` passes in."""
    key = zlib.crc32(np.ascontiguousarray(Y, dtype=np.float64).tobytes())
    return float(np.random.default_rng([int(seed) % 2**64, key]).random())
