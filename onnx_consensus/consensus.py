"""Rank aggregation: the Consensus criterion.

Per metric, candidates are ranked ascending by score (rank 1 = least important; tied scores share their
average rank); ranks are summed over metrics (weighted, ``--weights``: sum_m w_m * rank_m, a metric not
named weighs 1); the smallest sum is removed first. Raw scores are never mixed, only ranks. Ties in the
(weighted) rank sum are broken deterministically, in this order:
1. the smaller worst (maximum) rank over the metrics of positive weight: no metric finds it important;
2. the earlier position in the graph.
A single metric is the same rule with one rank: tied scores fall to the earlier block.
The published code's ordering bug (sorting by score, then applying the mask in layer order) is avoided by
returning the order itself, which the pruner follows.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata


@dataclass
class BlockScore:
    """One candidate in one scoring round: raw scores and ranks per metric, and their rank sum."""

    id: str
    scores: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, float] = field(default_factory=dict)
    rank_sum: float = 0.0
    position: int = 0

    def to_json(self) -> dict:
        return {"id": self.id, "scores": self.scores, "ranks": self.ranks, "rank_sum": self.rank_sum}


def consensus(scores: Mapping[str, Mapping[str, float]], positions: Mapping[str, int] | None = None,
              metrics: Sequence[str] | None = None, weights: Mapping[str, float] | None = None) -> list[BlockScore]:
    """Order candidates by the Consensus: ``scores[block_id][metric]`` -> BlockScores, least important first.

    positions: block id -> topological position, for the final tie-break (default: the mapping's order).
    metrics: which metrics to combine (default: every metric present for the first block).
    weights: metric -> weight >= 0 of its rank in the sum (default 1 each); names outside ``metrics``
    raise InputError.
    """
    ids = list(scores)
    if not ids:
        return []
    positions = positions or {b: i for i, b in enumerate(ids)}
    metrics = list(metrics or next(iter(scores.values())).keys())
    table = {b: BlockScore(b, {m: float(scores[b][m]) for m in metrics}, position=positions[b]) for b in ids}
    for m in metrics:
        values = np.array([scores[b][m] for b in ids], dtype=np.float64)
        ranks = rankdata(values, method="average")
        for b, r in zip(ids, ranks):
            table[b].ranks[m] = float(r)
    w = _weights(metrics, weights)
    voting = [m for m in metrics if w[m] > 0] or metrics
    for bs in table.values():
        bs.rank_sum = float(sum(w[m] * bs.ranks[m] for m in metrics))
    return sorted(table.values(), key=lambda s: (s.rank_sum, max(s.ranks[m] for m in voting), s.position))


def _weights(metrics: Sequence[str], weights: Mapping[str, float] | None) -> dict[str, float]:
    from .errors import InputError

    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(metrics))
    if unknown:
        raise InputError(f"--weights: {', '.join(unknown)} not among the metrics ({', '.join(metrics)})")
    bad = [m for m, v in weights.items() if not (np.isfinite(v) and v >= 0)]
    if bad:
        raise InputError(f"--weights: weights must be finite and >= 0 ({', '.join(bad)})")
    return {m: float(weights.get(m, 1.0)) for m in metrics}
