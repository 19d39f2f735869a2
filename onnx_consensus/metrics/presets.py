"""Named criteria for ``--metrics``: presets and ``+`` combinations, resolved to metric names per model.

- ``paper``: the eight metrics of the published Consensus, in its order (``options.PAPER_METRICS``);
- ``output``: the output-level score that fits the model: ``output_kl`` when it has a class-score output,
  else ``output_mse`` + ``output_cosine`` (``metrics.output``);
- ``paper+output``: both, one rank sum; any item may join names and presets with ``+`` (``cka+output_kl``).
Duplicates are dropped, first occurrence kept. ``None`` (``--metrics`` not given) stands for
``options.DEFAULT_CRITERION``; the pipeline replaces it with ``options.default_criterion`` first, which knows
whether the pruned model is fine-tuned.
"""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import InputError
from ..options import DEFAULT_CRITERION, PAPER_METRICS
from .registry import get_metric

PRESETS = ("paper", "output")


def split_names(metrics: Sequence[str]) -> list[str]:
    """Items as given (``--metrics a,b+c``) -> tokens [a, b, c]."""
    out = []
    for item in metrics:
        out.extend(t.strip() for t in str(item).split("+") if t.strip())
    return out


def check_names(metrics: Sequence[str] | None) -> None:
    """InputError on an unknown metric or preset name, or an empty list (None: the default)."""
    tokens = split_names(DEFAULT_CRITERION if metrics is None else metrics)
    if not tokens:
        raise InputError("--metrics: no metric given")
    for t in tokens:
        if t not in PRESETS:
            get_metric(t)


def resolve_metrics(metrics: Sequence[str] | None, class_scores: bool = True) -> tuple[str, ...]:
    """Metric names for a model: presets expanded (``output`` by ``class_scores``: whether the model has a
    class-score output), duplicates dropped."""
    metrics = DEFAULT_CRITERION if metrics is None else metrics
    check_names(metrics)
    out: list[str] = []
    for t in split_names(metrics):
        if t == "paper":
            names = PAPER_METRICS
        elif t == "output":
            names = ("output_kl",) if class_scores else ("output_mse", "output_cosine")
        else:
            names = (t,)
        out.extend(n for n in names if n not in out)
    return tuple(out)
