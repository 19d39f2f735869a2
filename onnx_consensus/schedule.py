"""The rounds of a removal schedule, the same for residual blocks (``pruner.prune``) and decoder layers
(``llm.run``): a generator the caller drives, as Torch-Pruning's interactive ``step``.

    for rnd in rounds(eligible, score, schedule="iterative", rescore_top=None):
        pick = next(i for i in rnd.order if i in rnd.eligible)   # the caller's choice (cost, budget, ...)
        remove(pick)                                             # the caller's surgery
        if target_met():
            break

Each round asks ``eligible()`` for the candidates left ({id: candidate}, in a stable order), scores them with
``score`` (iterative: every round; one-shot: the first round only) and yields the ranking. ``rescore_top``
K: after the first round only the K best still eligible of the previous ranking are scored again; the others
keep their places behind them. The generator ends when no candidate is eligible. What a candidate is (a
``graph.blocks.Block``, a decoder layer's number) and how it is scored (``scoring.score_blocks``,
``llm.scoring.score_layers``) is the caller's; which candidates are eligible (``--only``/``--exclude``,
``--keep-per-stage``) the same rule for both (``allowed_ids``, ``eligible_now``).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InputError

SCHEDULES = ("iterative", "one-shot")


@dataclass
class Round:
    """One step of the schedule. number: 0, 1, ...; order: every id ranked so far, least important first (ids
    removed earlier may still be in it: pick among ``eligible``); eligible: {id: candidate} of this step;
    scored: the scorer's result when this step scored (its ``order`` of ids), else None (one-shot)."""

    number: int
    order: list[str]
    eligible: Mapping[str, Any]
    scored: Any = None

    def first(self) -> str:
        """The least important eligible id."""
        return next(i for i in self.order if i in self.eligible)


def allowed_ids(ids: Iterable[str], only: Collection[str] = (), exclude: Collection[str] = ()) -> set[str]:
    """The candidate ids ``--only`` (all when empty) and ``--exclude`` leave."""
    return set(only or ids) - set(exclude)


def eligible_now(current: Mapping[str, Any], stages: Mapping[str, Hashable], removed: Collection[str],
                 allowed: Collection[str], keep_per_stage: int) -> dict[str, Any]:
    """The candidates of ``current`` ({id: candidate}, its order kept) that are ``allowed`` and whose stage
    still has more than ``keep_per_stage`` candidates left: ``stages`` {id: stage} of every original candidate,
    ``removed`` the ids removed so far."""
    left = Counter(stage for i, stage in stages.items() if i not in removed)
    return {i: c for i, c in current.items() if i in allowed and left[stages[i]] > keep_per_stage}


def check_schedule(schedule: str, rescore_top: int | None) -> None:
    """InputError for an unknown ``--schedule`` or a ``--rescore-top`` below 1."""
    if schedule not in SCHEDULES:
        raise InputError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if rescore_top is not None and rescore_top < 1:
        raise InputError("--rescore-top must be >= 1")


def rounds(eligible: Callable[[], Mapping[str, Any]], score: Callable[[Sequence[Any]], Any], *,
           schedule: str = "iterative", rescore_top: int | None = None) -> Iterator[Round]:
    """Yield the schedule's rounds until ``eligible()`` is empty (the caller breaks when its target is met).

    eligible: called before each round, after the caller's removal; {id: candidate}. score: called with the
    candidates to score (a list, ``eligible``'s order, or the previous ranking's for ``rescore_top``); returns
    an object whose ``order`` lists their ids, least important first."""
    check_schedule(schedule, rescore_top)
    order: list[str] = []
    number = 0
    while True:
        cands = eligible()
        if not cands:
            return
        scored = None
        if schedule == "iterative" or not order:
            subset = list(cands.values())
            if rescore_top is not None and order:
                subset = [cands[i] for i in order if i in cands][:rescore_top] or subset
            scored = score(subset)
            rescored = set(scored.order)
            order = list(scored.order) + [i for i in order if i not in rescored]
        yield Round(number, order, cands, scored)
        number += 1
