"""Pruning to a latency target (``--target-latency F``, ``--target-latency-ms T``) and the trade of damage
against time saved.

The schedule (``pruner.prune``) removes blocks until the removed blocks' predicted savings
(``latency_model.LatencyModel``) reach what the target needs; then the written model is measured beside the
original (the latency model's statistic, the same batch, threads and providers) and must meet both the
fraction of that measurement of the original and the target computed from the latency model. When it
misses, the schedule runs again from the original with the shortfall added to what must be saved, and at
least one block more than before (the iterative schedule is deterministic: the same removals come first), at
most ``ATTEMPTS`` times.

Latency is measured at batch 1, or the model's fixed batch: the latency a deployment waits for one request.

The trade (``Budget.pick``): each round ranks the candidates by damage (position 1 = least damage, the
criterion's own order); ``--latency-choice`` decides which one goes:
- ``damage``: the least damaging, whatever it saves;
- ``latency``: the smallest position / (its saving / the mean saving of the eligible blocks), so a block that
  saves twice the time may go at twice the damage rank;
- ``macs``: the same with MACs in place of measured time (the MAC-proportional choice).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from .errors import InputError
from .latency_model import QUANTILE, LatencyModel, measure_block_latency, round_times
from .options import LATENCY_CHOICES as CHOICES

__all__ = ["Budget", "CHOICES", "ATTEMPTS", "wanted_ms", "budget_for", "measure_pruned", "prune_to_latency"]

ATTEMPTS = 3


@dataclass
class Budget:
    """What the schedule must save: ``need_ms`` of predicted latency, given each block's ``saving_ms``;
    ``cost``: the per-block cost the choice weighs (ms saved or MACs; empty: damage order alone)."""

    need_ms: float
    saving_ms: Mapping[str, float]
    cost: Mapping[str, float] = field(default_factory=dict)

    def met(self, removed: Sequence[str]) -> bool:
        return sum(self.saving_ms.get(i, 0.0) for i in removed) >= self.need_ms - 1e-12

    def pick(self, order: Sequence[str], eligible: set[str]) -> str:
        """The block to remove next from the damage ``order`` (least damage first) restricted to ``eligible``."""
        ranked = [i for i in order if i in eligible]
        if not self.cost:
            return ranked[0]
        mean = float(np.mean([max(self.cost.get(i, 0.0), 0.0) for i in ranked])) or 1.0
        value = {i: (pos + 1) / max(self.cost.get(i, 0.0) / mean, 1e-3) for pos, i in enumerate(ranked)}
        return min(ranked, key=lambda i: (value[i], ranked.index(i)))

    def text(self, removed: Sequence[str]) -> str:
        saved = sum(self.saving_ms.get(i, 0.0) for i in removed)
        return f"{saved:.3f} of {self.need_ms:.3f} ms predicted saved"


def wanted_ms(base_ms: float, fraction: float | None, ms: float | None) -> float:
    """The target latency in ms: ``fraction`` of ``base_ms``, or ``ms`` (InputError when out of range)."""
    if fraction is not None and ms is not None:
        raise InputError("give --target-latency or --target-latency-ms, not both")
    if fraction is not None:
        if not 0 < fraction < 1:
            raise InputError("--target-latency must be a fraction of the original's latency between 0 and 1, e.g. 0.6")
        return fraction * base_ms
    if not ms > 0:
        raise InputError("--target-latency-ms must be > 0")
    return ms


def budget_for(lm: LatencyModel, target_ms: float, choice: str, blocks, extra_ms: float = 0.0) -> Budget:
    """The Budget reaching ``target_ms`` (plus ``extra_ms`` more saving) with the costs ``choice`` weighs."""
    if choice not in CHOICES:
        raise InputError(f"--latency-choice must be one of {', '.join(CHOICES)}, got {choice!r}")
    cost = {} if choice == "damage" else dict(lm.block_ms) if choice == "latency" else \
        {b.id: float(b.macs or 0) for b in blocks}
    return Budget(lm.base_ms - target_ms + extra_ms, dict(lm.block_ms), cost)


def latency_model_for(model: onnx.ModelProto, blocks, sample, axes, fixed: int | None,
                      threads: int | None) -> tuple[LatencyModel, dict]:
    """(the LatencyModel at batch 1 or the fixed batch, on inputs tiled from ``sample``, the feed used)."""
    from .bench import random_feed

    feed = random_feed(model, fixed or 1, sample, axes=axes)
    return measure_block_latency(model, blocks, feed, threads=threads), feed


def measure_pruned(model: onnx.ModelProto, pruned: onnx.ModelProto, feed: dict, threads: int | None,
                   runs: int) -> tuple[float, float]:
    """(original ms, pruned ms): the latency model's statistic, the two timed in alternated rounds."""
    t = round_times([model, pruned], feed, runs, threads or os.cpu_count())
    a, b = np.percentile(t, QUANTILE, axis=1)
    return float(a), float(b)


def prune_to_latency(model: onnx.ModelProto, data, options, *, fixed: int | None = None, axes=None,
                     between=None):
    """(PruneResult, the report's ``latency_target``): ``pruner.prune`` with a Budget from the latency
    model, re-run with the shortfall added while the measured latency misses the target (TargetError after
    ``ATTEMPTS``, or when every eligible block is gone). ``options``: the run's ``Options``."""
    from .errors import TargetError
    from .graph.blocks import find_blocks
    from .graph.flops import count_cost
    from .pruner import prune as schedule

    t, run = options.target, options.run
    if t.remove is not None or t.target_flops is not None or t.plan:
        raise InputError("a latency target cannot be combined with --remove, --target-flops or --plan")
    cost = count_cost(model, run.input_shapes or None)
    blocks = find_blocks(model, macs_per_node=cost.macs_per_node, unit=options.criterion.unit).blocks
    lm, feed = latency_model_for(model, blocks, next(data.batches(1)), axes, fixed, run.threads)
    target_ms = wanted_ms(lm.base_ms, t.target_latency, t.target_latency_ms)
    info = {"target_ms": target_ms, "fraction": t.target_latency, "batch_size": lm.batch_size,
            "choice": t.latency_choice, "statistic": f"p{QUANTILE} of alternated rounds", "model": lm.to_json(),
            "attempts": []}
    extra = 0.0
    for attempt in range(1, ATTEMPTS + 1):
        budget = budget_for(lm, target_ms, t.latency_choice, blocks, extra)
        result = schedule(model, data, criterion=options.criterion, target=t, run=run, between=between,
                          budget=budget)
        base, got = measure_pruned(model, result.model, feed, run.threads, lm.runs)
        # against the original timed in the same rounds, and never looser than the target from the latency model
        # (one slow re-measurement of the original must not pass a model that misses the first target)
        goal = min(t.target_latency * base, target_ms) if t.target_latency is not None else target_ms
        info["attempts"].append({"removed": len(result.removals), "predicted_ms": lm.predict(result.removed_ids),
                                 "measured_ms": got, "original_ms": base, "goal_ms": goal})
        info.update(measured_ms=got, original_ms=base, goal_ms=goal, met=got <= goal)
        if got <= goal:
            return result, info
        # the shortfall, and at least one more block: a re-run that only matched the saving already predicted
        # would remove the same blocks and miss by the same hair
        saved = lm.base_ms - lm.predict(result.removed_ids)
        extra = max(extra + got - goal, saved - (lm.base_ms - target_ms) + 1e-9)
    raise TargetError(f"latency target {goal:.3f} ms not met after {ATTEMPTS} attempts: the written model "
                      f"measured {got:.3f} ms with {len(result.removals)} blocks removed (original {base:.3f} ms)")
