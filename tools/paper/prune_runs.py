"""Table 1 of the reproduction: one iterative pruning run per criterion to the deepest level, and the test
accuracy of the models at every level right after pruning (no training: the deployment case).

    python -m tools.paper.prune_runs [--shard k/n]

Criteria: ``consensus`` (the eight metrics, rank sum), each single metric of Config.single_metrics,
``random<seed>`` (the random control), and ``published`` (the released code's effective order: the blocks
it offered, in layer order, whatever the scores; see ``published_order``; no scoring). Every criterion runs the same
iterative schedule on the same 512 calibration images (410 scored, 102 held back) with one block kept per
stage (the published order has its own rule). Results (removal order, scoring seconds, MACs and accuracy
per level) go to the cache.
"""
from __future__ import annotations

from .common import CONFIG, ROOT, Config, Timer, accuracy, load_result, original_model, pruned_model, \
    save_result, test_arrays, units_for_shard, worker_args
from .rows import LevelRow, OriginalRow, PruneRow


def published_order(model, depth: int) -> list[str]:
    """The released code's effective order: the blocks it offered, in layer order, whatever the scores.

    Its candidate list was every basic block except the first of stage 1 (which has an identity shortcut in
    the standard network, but the code skipped it), and sorting by score then applying the mask in layer
    order removed the first remaining offered block of the earliest stage each time, with no per-stage
    minimum: for ResNet-56, blocks 2-9 of stage 1, then 2-9 of stage 2, then stage 3 (21 = 8 + 8 + 5)."""
    from onnx_consensus import find_blocks

    blocks = sorted(find_blocks(model).blocks, key=lambda b: (b.stage, b.position))
    return [b.id for b in blocks[1:depth + 1]]


def metrics_of(criterion: str) -> tuple[tuple[str, ...], int]:
    if criterion == "consensus":
        return ("paper",), 0
    if criterion.startswith("random"):
        return ("random",), int(criterion[len("random"):])
    return (criterion,), 0


def run_criterion(criterion: str, config: Config) -> PruneRow:
    from onnx_consensus import CriterionOptions, RunOptions, TargetOptions, load_calibration
    from onnx_consensus.pruner import prune

    model = original_model(config)
    depth = max(config.levels)
    clock = Timer()
    if criterion == "published":
        order, rounds = published_order(model, depth), 0
    else:
        metrics, seed = metrics_of(criterion)
        data = load_calibration(ROOT / config.calib, model)
        res = prune(model, data, criterion=CriterionOptions(metrics=metrics, seed=seed),
                    target=TargetOptions(remove=depth), run=RunOptions(threads=config.threads))
        order, rounds = res.removed_ids, len(res.rounds)
    return PruneRow(criterion, order, rounds, clock(), config.threads)


def level_rows(criterion: str, config: Config) -> list[LevelRow]:
    from onnx_consensus import count_cost

    x, y = test_arrays()
    base = count_cost(original_model(config))
    rows = []
    for level in config.levels:
        m = pruned_model(criterion, level, config)
        cost = count_cost(m)
        rows.append(LevelRow(level, cost.total_macs, cost.params, 1 - cost.total_macs / base.total_macs,
                             accuracy(m, x, y, threads=config.threads)))
    return rows


def main(argv=None) -> None:
    args = worker_args(__doc__, argv)
    config = CONFIG
    if args.shard in (None, "0/2", "0/1") and load_result("prune", "original", config) is None:
        from onnx_consensus import count_cost

        x, y = test_arrays()
        cost = count_cost(original_model(config))
        save_result("prune", "original", OriginalRow(accuracy(original_model(config), x, y, config.threads),
                                                     cost.total_macs, cost.params), config)
    for criterion in units_for_shard(config.criteria, args.shard):
        done = load_result("prune", criterion, config)
        if done is None or not done.levels:
            done = run_criterion(criterion, config)
            save_result("prune", criterion, done, config)  # the order first: level_rows rebuilds from it
            done.levels = level_rows(criterion, config)
            save_result("prune", criterion, done, config)
        accs = ", ".join(f"{r.level}: {r.accuracy:.2%}" for r in done.levels)
        print(f"{criterion:<10} pruned in {done.prune_seconds:.0f} s; no fine-tuning {accs}", flush=True)


if __name__ == "__main__":
    main()
