"""The one fine-tuning job every caller runs: `prune --finetune-*` (``after_prune``), the ``finetune`` command
(``command``) and decoder distillation (``decoder``).

    rec = tune(pruned, training_batches(train, 32), teacher=original, config=cfg, select=evaluator(original, ev))
    rec.model        # the best of {pruned, each epoch} on the evaluation data (``best.BestOf``)

``tune`` measures the model given (rank 0 only under torchrun), trains (``train.finetune``: one process or a
rank of DDP) and keeps the best of it and each epoch; ``finetune_pruned`` builds the batches and the evaluator
of a block model first, ``finetune_model`` also checks the data and says what happened as a ``FinetuneReport``;
``guarded`` turns a failure into the report's error and the exit code (4; 130 interrupted with --keep-partial).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import onnx

from ..errors import FinetuneError, InputError, first_lines
from .best import BestOf
from .checks import check_config
from .epochs import training_batches
from .evaluator import Evaluator, evaluator
from .results import FinetuneReport

if TYPE_CHECKING:
    from .train import FinetuneResult

log = logging.getLogger("onnx_consensus")

__all__ = ["Recovery", "finetune_model", "finetune_pruned", "guarded", "tune"]


@dataclass
class Recovery:
    """What one fine-tuning job returns; the measures are on the evaluation data (None without it, and on the
    ranks other than 0)."""

    model: onnx.ModelProto  # the model kept: the model given when no epoch beat it
    result: FinetuneResult  # best_epoch 0 when the model given was kept
    before: float | None  # the model given
    after: float | None  # the model kept
    original: float | None  # the unpruned model (``Evaluator.original_metric``)


def tune(student: onnx.ModelProto, batches, *, teacher: onnx.ModelProto | None, config,
         select: Callable[[onnx.ModelProto], float] | None = None, dist=None, progress: bool = True,
         distill_outputs: list[str] | None = None) -> Recovery:
    """Fine-tune ``student`` on ``batches`` (``epochs.training_batches``; distillation from ``teacher`` when
    they carry no labels) and keep the best of {``student``, each epoch} by ``select`` (higher better; the
    last epoch without it). ``dist``: this process is one torchrun rank; only rank 0 measures."""
    from . import train

    if dist is not None and not dist.is_main:
        select = None
    before = select(student) if select is not None else None
    model, result = train.finetune(student, batches, teacher=teacher, config=config, eval_fn=select,
                                   progress=progress, dist=dist, distill_outputs=distill_outputs,
                                   keep=BestOf(student, before))
    if select is not None and result.best_epoch == 0:
        tried = [h["metric"] for h in result.history if h.get("metric") is not None]
        log.info("no fine-tuned epoch beat the pruned model (%s %.4f vs best %s): keeping the pruned model",
                 getattr(select, "metric", "measure"), before, f"{max(tried):.4f}" if tried else "n/a")
    return Recovery(model, result, before, result.best_metric if select is not None else None,
                    getattr(select, "original_metric", None))


def finetune_pruned(original: onnx.ModelProto, pruned: onnx.ModelProto, train_data, *, config,
                    eval_data=None, threads: int | None = None, progress: bool = True, dist=None,
                    eval_fn: Evaluator | None = None, train_indices=None, batch_size: int = 64) -> Recovery:
    """Fine-tune ``pruned`` on ``train_data`` (the samples ``train_indices``, default all), distilling from
    ``original`` when ``train_data`` has no labels.

    With ``eval_data`` (or a ready ``eval_fn``, e.g. an Evaluator on the hold-out) the returned model is the
    best of {the pruned model (epoch 0), each fine-tuned epoch} on it (``best.BestOf``). Without either, the
    last epoch's.

    dist (``bridge.distributed.DistContext``, under torchrun): this process is one rank; it trains on its
    shard with ``config.batch_size // world_size`` samples per step (the global batch stays
    ``config.batch_size``), and only rank 0 evaluates (its metrics; None on the others)."""
    if dist is not None and not dist.is_main:
        eval_fn = None
    elif eval_fn is None and eval_data is not None:
        eval_fn = evaluator(original, eval_data, threads=threads, batch_size=batch_size)
    teacher = None if train_data.labels is not None else original
    world = 1 if dist is None else dist.world_size
    batches = training_batches(train_data, config.batch_size // world, config.seed, train_indices, dist=dist)
    return tune(pruned, batches, teacher=teacher, config=config, select=eval_fn, dist=dist, progress=progress)


def finetune_model(student: onnx.ModelProto, train, *, config, teacher: onnx.ModelProto | None = None,
                   eval_data=None, threads: int | None = None, progress: bool = True, dist=None, eval_fn=None,
                   train_indices=None, batch_size: int = 64,
                   report: type[FinetuneReport] = FinetuneReport) -> tuple[onnx.ModelProto, FinetuneReport]:
    """Fine-tune ``student`` on ``train`` (CalibrationData): supervised when it has labels, else by
    distillation from ``teacher``; the best of {``student``, each epoch} on ``eval_data`` (accuracy with labels,
    else the fidelity to ``teacher`` in the outputs' terms, ``evaluator.Evaluator``) is returned, with what
    happened as a ``report`` (a FinetuneReport class). ``eval_fn``: a ready Evaluator instead of ``eval_data``
    (e.g. on a hold-out); ``train_indices``: train on these samples only. Under torchrun (``dist``) every rank
    calls it with the same arguments; ``config.batch_size`` is the global batch; only rank 0 evaluates. Raises
    InputError for data the run cannot use, FinetuneError when training fails."""
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
    # with labels and no teacher the evaluator's reference is the student itself: accuracy needs none
    reference = teacher if teacher is not None else student
    if eval_fn is None and eval_data is not None and (dist is None or dist.is_main):
        # the evaluator names its measure in the output's terms (accuracy, agreement, cosine, detections kept)
        eval_fn = evaluator(reference, eval_data, threads=threads, batch_size=batch_size)
    rec = finetune_pruned(reference, student, train, config=config, eval_data=eval_data, threads=threads,
                          progress=progress, dist=dist, eval_fn=eval_fn, train_indices=train_indices,
                          batch_size=batch_size)
    res = rec.result
    tried = [h["metric"] for h in res.history if h.get("metric") is not None]
    info = report(mode=mode, epochs=config.epochs, train_samples=train.n_samples,
                  eval=eval_data.source if eval_data is not None else None, processes=world,
                  metric=getattr(eval_fn, "metric", None) or metric or "agreement",
                  metric_original=rec.original if teacher is not None else None, metric_before=rec.before,
                  metric_after=rec.after, best_epoch=res.best_epoch, images_seen=res.images_seen * world,
                  seconds=round(res.seconds, 2), history=res.history, best_finetuned=max(tried) if tried else None,
                  bn_stats=res.bn_stats, losses=[spec.to_json() for spec in res.losses])
    if eval_fn is not None or eval_data is not None:
        info.eval_samples = eval_fn.n_samples if eval_fn is not None else eval_data.n_samples
    return rec.model, info


def guarded(run: Callable[[], Any], *, keep_partial: bool) -> tuple[Any, str | None, int]:
    """``run()`` for a caller that keeps the pruned model when fine-tuning fails: (its value, None, 0); a
    failure (FinetuneError, or an error of onnxruntime / torch midway) gives (None, the one-line error, 4), an
    interruption with ``keep_partial`` (None, the error, 130). Bad input (InputError) and an interruption
    without ``keep_partial`` pass through."""
    try:
        return run(), None, 0
    except InputError:
        raise
    except FinetuneError as exc:
        return None, str(exc), exc.exit_code
    except Exception as exc:  # noqa: BLE001 - e.g. onnxruntime failing on the teacher or the evaluation midway
        return None, f"fine-tuning failed: {type(exc).__name__}: {first_lines(exc)}", FinetuneError.exit_code
    except KeyboardInterrupt:
        if not keep_partial:
            raise
        return None, "fine-tuning interrupted (--keep-partial)", 130
