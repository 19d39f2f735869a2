"""Rank aggregation: the Consensus criterion.

Per metric, candidates are ranked ascending by score (rank 1 = least important; tied scores share their
average rank); ranks are summed over metrics; the smallest sum is removed first. Raw scores are never
mixed, only ranks. Ties in the rank sum are broken deterministically, in this order:
1. the smaller worst (maximum) rank over the metrics: no metric finds it important;
2. the earlier position in the graph.
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
              metrics: Sequence[str] | None = None) -> list[BlockScore]:
    """Order candidates by the Consensus: ``scores[block_id][metric]`` -> BlockScores, least important first.

    positions: block id -> topological position, for the final tie-break (default: the mapping's order).
    metrics: which metrics to combine (default: every metric present for the first block).
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
    for bs in table.values():
        bs.rank_sum = float(sum(bs.ranks.values()))
    return sorted(table.values(), key=lambda s: (s.rank_sum, max(s.ranks.values()), s.position))
