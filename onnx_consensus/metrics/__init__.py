"""Representation-similarity metrics (pure NumPy/SciPy) for the Consensus criterion.

    from onnx_consensus.metrics import score, register_metric, available_metrics, get_metric, DEFAULT_METRICS
    score("cka", X, Y)            # X, Y: (n, d) arrays, low = similar

Importing this package registers every built-in metric.
"""
from . import baselines, cka, gaussian, linear, output, permutation, wasserstein  # noqa: F401  (registration)
from ..options import DEFAULT_METRICS, PAPER_METRICS  # noqa: F401  (defined once, with the --metrics option)
from .presets import resolve_metrics
from .registry import MetricSpec, available_metrics, get_metric, register_metric, score

__all__ = ["DEFAULT_METRICS", "PAPER_METRICS", "resolve_metrics", "MetricSpec", "available_metrics", "get_metric", "register_metric", "score"]
