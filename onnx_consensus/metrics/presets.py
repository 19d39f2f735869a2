"""Named criteria for ``--metrics``: presets and ``+`` combinations, resolved to metric names per model.

- ``paper``: the eight metrics of the published Consensus, in its order (``options.PAPER_METRICS``);
- ``output``: the output-level score that fits the model (``output_preset``): ``output_kl`` for class
  scores, ``output_mse`` + ``output_cosine`` for embeddings, ``output_fidelity`` (the per-kind measure) for
  detectors, text maps, CTC, regressions and mixes (``metrics.output``);
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


def output_preset(class_scores: bool = True, plan=None) -> tuple[str, ...]:
    """What ``output`` means for a model. With its output plan (``kinds.OutputPlan``): ``output_kl`` when
    every output is class scores, ``output_mse`` + ``output_cosine`` when every one is an embedding (both as
    chosen on the criterion benchmark), else ``output_fidelity`` (the per-kind measure the budget reads:
    detectors, text maps, CTC, regressions, mixes, a --fidelity function). Without a plan, by ``class_scores``
    (whether the model has a class-score output)."""
    if plan is not None:
        if plan.only_kinds("class scores"):
            return ("output_kl",)
        if plan.only_kinds("embedding"):
            return ("output_mse", "output_cosine")
        return ("output_fidelity",)
    return ("output_kl",) if class_scores else ("output_mse", "output_cosine")


def resolve_metrics(metrics: Sequence[str] | None, class_scores: bool = True, plan=None) -> tuple[str, ...]:
    """Metric names for a model: presets expanded (``output`` by ``output_preset``), duplicates dropped."""
    metrics = DEFAULT_CRITERION if metrics is None else metrics
    check_names(metrics)
    out: list[str] = []
    for t in split_names(metrics):
        if t == "paper":
            names = PAPER_METRICS
        elif t == "output":
            names = output_preset(class_scores, plan)
        else:
            names = (t,)
        out.extend(n for n in names if n not in out)
    return tuple(out)
