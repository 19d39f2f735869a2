"""One fine-tuning run of an ONNX model, the same for `onnx-cprune finetune` and for
`onnx-cprune prune --finetune-epochs` (``pipeline``): check the options, fine-tune through the bridge
(``recover.finetune_pruned``: supervised with labels, else distillation from the teacher), and say what
happened as the report's ``finetune`` entry.

    model, info = finetune_model(student, train, config=cfg, teacher=original, eval_data=ev, dist=ctx)

Under torchrun (``dist`` a ``bridge.distributed.DistContext``) every rank calls it with the same
arguments; ``config.batch_size`` is the global batch, split evenly over the ranks, and only rank 0
evaluates (``info``'s metrics are None on the others). Writing is the caller's (rank 0's) job.
"""
from __future__ import annotations

import onnx

from .errors import InputError

__all__ = ["check_config", "finetune_model"]


def check_config(config, *, world_size: int = 1) -> None:
    """InputError (one line) for options no run could use: epochs < 1, a batch that does not split over
    ``world_size`` ranks, an unusable ``device`` / ``amp``. Needs torch (``recover.require_torch`` first)."""
    from .bridge.finetune import training_device

    if config.epochs < 1:
        raise InputError(f"--finetune-epochs must be >= 1, got {config.epochs}")
    if config.batch_size < 1:
        raise InputError(f"--ft-batch-size must be >= 1, got {config.batch_size}")
    if config.batch_size % world_size:
        raise InputError(f"--ft-batch-size {config.batch_size} is the global batch and must split evenly over "
                         f"{world_size} processes")
    training_device(config)


def finetune_model(student: onnx.ModelProto, train, *, config, teacher: onnx.ModelProto | None = None,
                   eval_data=None, threads: int | None = None, progress: bool = True,
                   dist=None, eval_fn=None, train_indices=None, batch_size: int = 64) -> tuple[onnx.ModelProto, dict]:
    """Fine-tune ``student`` on ``train`` (CalibrationData): supervised when it has labels, else by
    distillation from ``teacher``; the best epoch on ``eval_data`` (accuracy with labels, else the fidelity to
    ``teacher`` in the outputs' terms, ``recover.Evaluator``) is returned. Returns (the fine-tuned model: same graph, names and
    interface as ``student``, new weights; the report entry: mode, epochs, samples, metric name, metric of
    the teacher / before / after, best epoch (0: no epoch beat ``student`` on the evaluation data, which is
    returned), images, seconds, per-epoch history, bn_stats, the distillation loss of each output). ``eval_fn``: a ready ``recover.Evaluator``
    instead of ``eval_data`` (e.g. on a hold-out); ``train_indices``: train on these samples only. Raises InputError for
    data the run cannot use, FinetuneError when training fails."""
    mode = "supervised" if train.labels is not None else "distillation"
    if mode == "distillation" and teacher is None:
        raise InputError("the training data has no labels (labels.npy): distillation needs the original model, "
                         "--teacher ORIGINAL.onnx")
    metric = None
    if eval_data is not None:
        metric = "accuracy" if eval_data.labels is not None else "agreement"
        if metric == "agreement" and teacher is None:
            raise InputError("the evaluation data has no labels: agreement needs the original model, "
                             "--teacher ORIGINAL.onnx")
    world = 1 if dist is None else dist.world_size
    if world > train.n_samples:
        raise InputError(f"{train.n_samples} training sample(s) cannot be shared among {world} processes")
    check_config(config, world_size=world)
    from .recover import finetune_pruned

    info = {"mode": mode, "epochs": config.epochs, "train_samples": train.n_samples,
            "eval": eval_data.source if eval_data is not None else None, "processes": world}
    # with labels and no teacher the evaluator's reference is the student itself: accuracy needs none
    reference = teacher if teacher is not None else student
    if eval_fn is None and eval_data is not None and (dist is None or dist.is_main):
        from .recover import evaluator

        # the evaluator names its measure in the output's terms (accuracy, agreement, cosine, detections kept)
        eval_fn = evaluator(reference, eval_data, threads=threads, batch_size=batch_size)
    tuned, res, before, after, original_metric = finetune_pruned(
        reference, student, train, config=config, eval_data=eval_data, threads=threads, progress=progress, dist=dist,
        eval_fn=eval_fn, train_indices=train_indices, batch_size=batch_size)
    tried = [h["metric"] for h in res.history if h.get("metric") is not None]
    info.update(metric_original=original_metric if teacher is not None else None, metric_before=before,
                metric_after=after, best_epoch=res.best_epoch, images_seen=res.images_seen * world,
                seconds=round(res.seconds, 2), history=res.history,
                metric=getattr(eval_fn, "metric", None) or metric or "agreement",
                best_finetuned=max(tried) if tried else None, kept="fine-tuned" if res.best_epoch else "pruned",
                bn_stats=res.bn_stats, losses=[spec.to_json() for spec in getattr(res, "losses", [])])
    if eval_fn is not None or eval_data is not None:
        info["eval_samples"] = eval_fn.n_samples if eval_fn is not None else eval_data.n_samples
    return tuned, info
