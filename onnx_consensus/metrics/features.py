"""From activations to metric inputs: pooling to (n, d) features, the PCA cap for the alignment metrics,
and the condition ids for the gaussian metrics."""
from __future__ import annotations

import warnings

import numpy as np
from scipy.cluster.vq import kmeans2

from ..errors import InputError


def pool_features(a: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Pool one activation tensor to (N, D) float64 features.

    (N,) -> (N, 1); (N, D) unchanged; (N, T, D) tokens -> mean over the tokens where ``mask`` (N, T)
    is nonzero (all tokens when None; a sample with no unmasked token gets zeros); (N, C, d1, d2, ...)
    with 4+ dims -> (N, C) mean over the spatial axes. A 3-D array is always read as tokens (N, T, D).
    Accumulates in float64 without a float64 copy of ``a``."""
    a = np.asarray(a)
    if a.ndim == 0 or a.shape[0] == 0:
        raise InputError(f"cannot pool an activation of shape {a.shape}")
    if mask is not None and a.ndim != 3:
        raise InputError(f"a mask applies to (N, T, D) token tensors, got an activation of shape {a.shape}")
    if a.ndim == 1:
        return a.astype(np.float64).reshape(-1, 1)
    if a.ndim == 2:
        return a.astype(np.float64)
    if a.ndim >= 4:
        return a.mean(axis=tuple(range(2, a.ndim)), dtype=np.float64)
    if mask is None:
        return a.mean(axis=1, dtype=np.float64)
    m = np.asarray(mask)
    if m.shape != a.shape[:2]:
        raise InputError(f"mask shape {m.shape} does not match the tokens {a.shape[:2]}")
    w = (m != 0).astype(np.float64)
    total = np.einsum("ntd,nt->nd", a, w, dtype=np.float64)
    count = w.sum(axis=1, keepdims=True)
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


#: ``pool_output``: fewest values per sample a grid-pooled map keeps.
GRID_MIN_DIM = 16


def pool_output(a: np.ndarray, mask: np.ndarray | None = None, *, min_dim: int = GRID_MIN_DIM) -> np.ndarray:
    """Pool a graph output (a feature of the global scope) to (N, d) float64.

    As ``metrics.features.pool_features`` (tokens averaged over the kept tokens, spatial axes averaged),
    except that a map (N, C, d1, d2, ...) with C < ``min_dim`` channels is averaged over a grid of cells
    rather than whole: a one-channel detection map averaged to one number per sample says nothing of where
    its mass is. g cells per spatial axis, g the smallest with C * g**k >= min_dim (k spatial axes); cell i
    of an axis of size S spans [floor(i*S/g), ceil((i+1)*S/g)) as in adaptive average pooling, never
    empty, so inputs of different sizes give the same d = C * g**k."""
    a = np.asarray(a)
    if a.ndim < 4 or a.shape[1] >= min_dim:
        return pool_features(a, mask)
    k = a.ndim - 2
    g = 1
    while a.shape[1] * g ** k < min_dim:
        g += 1
    cells = [a]
    for axis in range(2, a.ndim):
        size = a.shape[axis]
        spans = [(i * size // g, max(i * size // g + 1, -(-(i + 1) * size // g))) for i in range(g)]
        cells = [np.take(c, range(lo, hi), axis=axis) for c in cells for lo, hi in spans]
    pooled = [c.mean(axis=tuple(range(2, a.ndim)), dtype=np.float64) for c in cells]  # each (N, C)
    return np.concatenate(pooled, axis=1)



def pca_cap(X: np.ndarray, Y: np.ndarray, max_dim: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Cap the width of X, Y (n, d) for the alignment metrics (cubic in d).

    If d > max_dim: centre both by X's column mean and project both on X's leading principal axes,
    computed from X only, giving (n, k) float64 with k = min(max_dim, n, d) (a thin SVD has no more
    axes; directions beyond X's row space carry none of X's variance). Otherwise (X, Y) are returned
    unchanged. When X and Y have different widths, each is projected on its own leading axes."""
    if max_dim < 1:
        raise InputError("max_dim must be >= 1")
    X, Y = np.asarray(X), np.asarray(Y)
    if X.ndim != 2 or Y.ndim != 2:
        raise InputError(f"pca_cap needs 2-D features, got {X.shape} and {Y.shape}")
    if X.shape[1] != Y.shape[1]:
        return _own_axes(X, max_dim), _own_axes(Y, max_dim)
    if X.shape[1] <= max_dim:
        return X, Y
    mu = X.mean(axis=0, dtype=np.float64)
    axes = _leading_axes(X.astype(np.float64) - mu, max_dim)
    return (X - mu) @ axes, (Y - mu) @ axes


def _leading_axes(Xc: np.ndarray, k: int) -> np.ndarray:
    """(d, min(k, n, d)) leading right singular vectors of the centred Xc (n, d)."""
    _, _, Vt = np.linalg.svd(Xc, full_matrices=False)
    return Vt[:k].T


def _own_axes(A: np.ndarray, max_dim: int) -> np.ndarray:
    if A.shape[1] <= max_dim:
        return A
    Ac = A.astype(np.float64) - A.mean(axis=0, dtype=np.float64)
    return Ac @ _leading_axes(Ac, max_dim)


def make_conditions(predicted: np.ndarray | None, features: np.ndarray, *, labels: np.ndarray | None = None,
                    max_conditions: int = 10, min_count: int = 8, seed: int = 0) -> np.ndarray:
    """(n,) int64 condition ids 0..k-1 (k <= max_conditions) for the gaussian metrics.

    Source: ``labels`` when given, else ``predicted`` (class ids), else (non-classifier) k-means of
    ``features`` (n, d) into up to max_conditions clusters (scipy kmeans2, k-means++, seeded; at most
    n // min_count clusters). Then the max_conditions - 1 most frequent ids with >= min_count samples
    (ties: the smaller id) become conditions 0, 1, ... in decreasing frequency, and every other sample
    is merged into one last condition."""
    if max_conditions < 1 or min_count < 1:
        raise InputError("max_conditions and min_count must be >= 1")
    feats = np.asarray(features)
    n = feats.shape[0]
    source = labels if labels is not None else predicted
    if source is None:
        ids = _kmeans_ids(feats, max_conditions, min_count, seed)
    else:
        ids = np.asarray(source)
        if ids.shape != (n,):
            raise InputError(f"class ids must have shape ({n},), got {ids.shape}")
    values, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    order = np.lexsort((np.arange(values.size), -counts))  # values are sorted: ties -> smaller id
    kept = [c for c in order if counts[c] >= min_count][: max_conditions - 1]
    out = np.full(n, len(kept), dtype=np.int64)
    for new, c in enumerate(kept):
        out[inverse.reshape(-1) == c] = new
    return out


def _kmeans_ids(feats: np.ndarray, max_conditions: int, min_count: int, seed: int) -> np.ndarray:
    """Cluster ids (n,) from k-means of the (n, ...) features flattened per sample."""
    n = feats.shape[0]
    F = np.asarray(feats, dtype=np.float64).reshape(n, -1)
    k = max(1, min(max_conditions, n // min_count))
    F = F - F.mean(axis=0)
    spread = F.std(axis=0)
    if k == 1 or not np.any(spread > 0):
        return np.zeros(n, dtype=np.int64)
    with warnings.catch_warnings():  # empty clusters are fine: ids are recomputed by frequency
        warnings.simplefilter("ignore")
        _, ids = kmeans2(F, k, minit="++", seed=np.random.default_rng(seed), missing="warn")
    return ids.astype(np.int64)
