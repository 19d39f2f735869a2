"""1-D Wasserstein distance between the value distributions of two representations."""
from __future__ import annotations

import numpy as np
from scipy.stats import wasserstein_distance

from .registry import register_metric


@register_metric("wasserstein", alignment=False)
def wasserstein_score(X: np.ndarray, Y: np.ndarray, labels=None, *, seed: int = 0) -> float:
    """W1 distance between the empirical distributions of all entries of X (n, dx) and of Y (n, dy).

    Compares value histograms only: blind to which sample or unit a value belongs to, not scale
    invariant. Cost O(N log N), N = n * (dx + dy)."""
    return float(wasserstein_distance(X.ravel(), Y.ravel()))
