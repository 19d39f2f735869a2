"""Table 5 of the reproduction: Consensus at the deepest level (Config.levels[-1] blocks) against the
fine-tuning budget, so a reader sees where a longer fine-tune would land.

    python -m tools.paper.budget_curve [--shard k/n]

Each budget is its own run: one pass over the first N training images with its own cosine schedule
(supervised, seed 0, the recipe of finetune_runs); N = Config.curve_budgets (60,000 = one full epoch),
then MULTI_EPOCH_BUDGETS (2 and 4 epochs over all 60,000, one cosine schedule over the run).
"""
from __future__ import annotations

from .common import CONFIG, test_arrays, units_for_shard, worker_args
from .finetune_runs import finetune_unit

MULTI_EPOCH_BUDGETS = (120_000, 240_000)  # unit names carry the budget, so adding one reuses the cache


def main(argv=None) -> None:
    args = worker_args(__doc__, argv)
    config = CONFIG
    test = test_arrays()
    level = max(config.levels)
    # largest first, so two workers finish together
    for budget in units_for_shard(sorted(config.curve_budgets + MULTI_EPOCH_BUDGETS, reverse=True), args.shard):
        row = finetune_unit("consensus", level, "supervised", 0, budget, config, test=test)
        print(f"consensus {level} blocks, {budget} images: {row.accuracy:.2%} "
              f"({row.finetune_seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
