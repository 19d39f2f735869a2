"""The metric registry and the one entry point, ``score``, that validates inputs before any metric runs.

A metric is a pure function ``f(X, Y, labels=None, *, seed=0) -> float`` on two (n, d) float64 arrays
(validated, C-contiguous, finite, n >= 2) that returns a dissimilarity: low = similar, 0 = identical up
to the metric's invariance.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

MetricFn = Callable[..., float]


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric. ``alignment`` marks the metrics whose cost is cubic in d (the caller caps d
    with ``features.pca_cap`` before calling them). ``output`` marks the output-level scores
    (``metrics.output``): in a prune run X is the ORIGINAL model's graph outputs, Y the outputs without the
    candidate, streamed by the scorer rather than passed as feature matrices."""

    name: str
    fn: MetricFn
    alignment: bool
    description: str
    output: bool = False


_REGISTRY: dict[str, MetricSpec] = {}


def register_metric(name: str, alignment: bool = False, *, description: str | None = None,
                    replace: bool = False, output: bool = False) -> Callable[[MetricFn], MetricFn]:
    """Decorator registering ``fn(X, Y, labels=None, *, seed=0) -> float`` under ``name``.

    description: defaults to the first line of the function's docstring. Registering a taken name
    raises ValueError unless ``replace=True``. Returns the function unchanged."""
    if not isinstance(name, str) or not name:
        raise ValueError("metric name must be a non-empty string")

    def decorate(fn: MetricFn) -> MetricFn:
        if name in _REGISTRY and not replace:
            raise ValueError(f"metric {name!r} is already registered")
        doc = description if description is not None else (fn.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = MetricSpec(name, fn, bool(alignment), doc, bool(output))
        return fn

    return decorate


def available_metrics() -> tuple[str, ...]:
    """Names of all registered metrics, in registration order."""
    return tuple(_REGISTRY)


def get_metric(name: str) -> MetricSpec:
    """The spec registered under ``name``; InputError naming the available metrics otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown metric {name!r}; available: {', '.join(available_metrics())}") from None


def as_features(A, what: str = "X") -> np.ndarray:
    """Validate one (n, d) representation and return it as C-contiguous float64 (any float or int dtype
    in, float16 included). InputError on non-2-D input, an empty feature axis or NaN/Inf."""
    try:
        arr = np.asarray(A)
    except Exception as exc:  # ragged lists and the like
        raise InputError(f"{what}: not an array ({exc})") from None
    if arr.ndim != 2:
        raise InputError(f"{what} must be 2-D (n_samples, n_features), got shape {arr.shape}")
    if arr.dtype.kind not in "fiub":
        raise InputError(f"{what} must be numeric, got dtype {arr.dtype}")
    if arr.shape[1] < 1:
        raise InputError(f"{what} has no features (shape {arr.shape})")
    out = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.isfinite(out).all():
        raise InputError(f"{what} contains NaN or Inf")
    return out


def _check_labels(labels, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    lab = np.asarray(labels)
    if lab.shape != (n,):
        raise InputError(f"labels must have shape ({n},), got {lab.shape}")
    if lab.dtype.kind not in "iub":
        if lab.dtype.kind == "f" and np.all(np.isfinite(lab)) and np.all(lab == np.round(lab)):
            lab = lab.astype(np.int64)
        else:
            raise InputError(f"labels must be integer condition ids, got dtype {lab.dtype}")
    return lab


def score(name: str, X, Y, labels=None, *, seed: int = 0) -> float:
    """Dissimilarity of two representations of the same n samples under metric ``name``.

    X: (n, dx), Y: (n, dy), any real dtype (computed in float64); most metrics accept dx != dy, the
    per-sample baselines (cosine, angular) need dx == dy. labels: optional (n,) integer condition ids
    (used by the gaussian metrics). Returns a finite float, low = similar.
    Raises InputError on non-2-D input, NaN/Inf, n < 2, different sample counts or bad labels."""
    spec = get_metric(name)
    Xf, Yf = as_features(X, "X"), as_features(Y, "Y")
    if Xf.shape[0] != Yf.shape[0]:
        raise InputError(f"X and Y must have the same number of samples, got {Xf.shape} and {Yf.shape}")
    if Xf.shape[0] < 2:
        raise InputError(f"need at least 2 samples, got {Xf.shape[0]}")
    lab = _check_labels(labels, Xf.shape[0])
    return float(spec.fn(Xf, Yf, lab, seed=seed))
