"""Table 2 of the reproduction: test accuracy after a fixed fine-tuning budget, supervised (labels) and by
label-free distillation from the original, for every criterion and level.

    python -m tools.paper.finetune_runs [--stage seeds] [--shard k/n]

Budget: one pass over the first Config.train_images Fashion-MNIST training images (batch 64, the bridge's
recipe: SGD momentum 0.9, cosine decay, lr 0.002 for BN-folded graphs, gradients clipped to norm 1.0;
distillation: KL at T=4 from the original run by onnxruntime). The same budget, data and seed for every
criterion; the model after the last step is evaluated (no epoch is picked on test data).
Stage ``seed0`` (default): every criterion with seed 0. Stage ``seeds``: seeds 1 and 2 for the Consensus and
for the best single metric (highest mean seed-0 accuracy over levels and modes), so their spread shows.
"""
from __future__ import annotations

from .common import CONFIG, Config, Timer, accuracy, load_result, original_model, pruned_model, save_model, \
    save_result, test_arrays, train_data, units_for_shard, worker_args
from .rows import FinetuneRow

MODES = ("supervised", "distillation")
TRAIN_SET = 60_000  # Fashion-MNIST training images


def unit_name(criterion: str, level: int, mode: str, seed: int, budget: int) -> str:
    return f"{criterion}-L{level}-{mode}-s{seed}-n{budget}"


def finetune_unit(criterion: str, level: int, mode: str, seed: int, budget: int, config: Config,
                  keep_model: bool = False, test=None) -> FinetuneRow:
    """Fine-tune the ``level`` model of ``criterion`` on one pass over the first ``budget`` training images
    (past 60,000: budget / 60,000 epochs over all of them); cached by all of those."""
    name = unit_name(criterion, level, mode, seed, budget)
    done = load_result("finetune", name, config)
    if done is not None:
        return done
    from onnx_consensus import FinetuneConfig
    from onnx_consensus.finetune.job import finetune_pruned

    x, y = test if test is not None else test_arrays()
    original = original_model(config)
    pruned = pruned_model(criterion, level, config)
    # budgets past the training set: whole epochs over all of it (one cosine schedule over the run)
    epochs, images = (budget // TRAIN_SET, TRAIN_SET) if budget > TRAIN_SET else (1, budget)
    data = train_data(images, labelled=mode == "supervised", config=config)
    ft_config = FinetuneConfig(epochs=epochs, batch_size=config.ft_batch_size, seed=seed, threads=config.threads)
    clock = Timer()
    rec = finetune_pruned(original, pruned, data, config=ft_config, eval_data=None, threads=config.threads,
                          progress=False)
    seconds = clock()
    row = FinetuneRow(criterion, level, mode, seed, budget, rec.result.images_seen, seconds, config.threads,
                      accuracy(rec.model, x, y, threads=config.threads),
                      rec.result.history[-1]["loss"] if rec.result.history else None)
    if keep_model:
        save_model("finetune", name, rec.model, config)
    save_result("finetune", name, row, config)
    return row


def best_single(config: Config) -> str | None:
    """The single metric with the highest mean seed-0 fine-tuned accuracy over levels and modes (None until
    all of their seed-0 runs exist)."""
    means = {}
    for metric in config.single_metrics:
        rows = [load_result("finetune", unit_name(metric, lv, mode, 0, config.train_images), config)
                for lv in config.levels for mode in MODES]
        if any(r is None for r in rows):
            return None
        means[metric] = sum(r.accuracy for r in rows) / len(rows)
    return max(means, key=means.get)


def units(stage: str, config: Config) -> list[tuple]:
    if stage == "seed0":
        return [(c, lv, mode, 0) for c in config.criteria for lv in config.levels for mode in MODES]
    best = best_single(config)
    if best is None:
        raise SystemExit("the seed-0 runs of the single metrics are not all done: run the seed0 stage first")
    return [(c, lv, mode, s) for c in ("consensus", best) for s in config.ft_seeds if s != 0
            for lv in config.levels for mode in MODES]


def keeps_model(criterion: str, seed: int, config: Config) -> bool:
    """Robustness needs the seed-0 fine-tuned models of the Consensus and of every single metric (the
    best one is only known afterwards)."""
    return seed == 0 and criterion in ("consensus", *config.single_metrics)


def main(argv=None) -> None:
    args = worker_args(__doc__, argv, lambda ap: ap.add_argument("--stage", choices=("seed0", "seeds"), default="seed0"))
    config = CONFIG
    test = test_arrays()
    for criterion, level, mode, seed in units_for_shard(units(args.stage, config), args.shard):
        row = finetune_unit(criterion, level, mode, seed, config.train_images, config,
                            keep_model=keeps_model(criterion, seed, config), test=test)
        print(f"{criterion:<10} {level} blocks {mode:<12} seed {seed}: {row.accuracy:.2%} "
              f"({row.finetune_seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
