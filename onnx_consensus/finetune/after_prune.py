"""`prune --finetune-*`: fine-tune the pruned model of a prune run (``job.finetune_model``, the code of the
``finetune`` command) on ``--train`` or the calibration data without its hold-out, keep the best of {pruned,
each epoch} on ``--eval`` or the hold-out, and on failure keep the pruned model (exit 4; 130 interrupted with
--keep-partial)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import onnx

from ..data.for_model import extra_data_for
from ..options import BN_FREEZE_BELOW
from .results import PruneFinetuneReport

__all__ = ["after_prune"]


def after_prune(original: onnx.ModelProto, result, calib, options, warn: Callable[[str], None]) -> tuple[
        PruneFinetuneReport, int]:
    """Fine-tune ``result.model`` (a ``pruner.PruneResult`` of ``original`` on ``calib``) as ``options`` (an
    ``options.Options``) say; returns (the report's ``finetune`` entry, the exit code: 0, 4 failed, 130
    interrupted with keep_partial). ``warn(message)`` says what the user should know.

    The model kept is the best of {pruned, each epoch} on the ``--eval`` data, or on the hold-out without it
    (the pruned model when no epoch beats it, said through ``warn``). Training on the calibration data (no
    ``--train``) leaves the hold-out out. When an epoch is kept, ``result.model`` becomes it and
    ``result.fidelity`` is re-measured on it, so the summary and report describe the written model; the
    pre-fine-tune value stays in ``holdout_fidelity_pruned``."""
    from ..kinds import output_plan
    from ..report import not_improved_text
    from . import job
    from .evaluator import evaluator

    rec, run = options.recovery, options.run
    hold = result.holdout_indices
    if hold is None:  # a PruneResult made elsewhere: the pruner's own split
        hold = np.arange(calib.n_samples) if calib.n_samples < 10 or run.holdout <= 0 else \
            calib.split(run.holdout, seed=options.criterion.seed)[1]
    train, train_idx = _training_data(original, calib, hold, options, warn)
    n_train = train.n_samples if train_idx is None else len(train_idx)
    eval_data = extra_data_for(rec.eval, original, options.data)
    config = replace(options.finetune, task=options.criterion.task, output_kind=options.criterion.output_kind)
    info = PruneFinetuneReport(
        mode="supervised" if train.labels is not None else "distillation", epochs=config.epochs,
        train_samples=n_train, eval=eval_data.source if eval_data is not None else "hold-out",
        holdout_fidelity_pruned=result.fidelity.to_json() if result.fidelity else None)

    def fine_tune():
        c = options.criterion
        plan = output_plan(original, c.task, c.output_kind, c.fidelity)  # the pruner's measure, here too
        holdout = evaluator(original, calib, indices=hold, batch_size=run.batch_size, threads=run.threads, plan=plan)
        select = holdout if eval_data is None else evaluator(original, eval_data, batch_size=run.batch_size,
                                                             threads=run.threads, plan=plan)
        tuned, ft = job.finetune_model(result.model, train, config=config, teacher=original, eval_fn=select,
                                       threads=run.threads, progress=run.progress, train_indices=train_idx,
                                       batch_size=run.batch_size, report=PruneFinetuneReport)
        return tuned, ft, holdout.fidelity(tuned) if ft.best_epoch > 0 else None

    done, error, code = job.guarded(fine_tune, keep_partial=options.output.keep_partial)
    if error is not None:
        info.error = error
        return info, code
    tuned, ft, fid = done
    ft.train_samples, ft.eval, ft.holdout_fidelity_pruned = n_train, info.eval, info.holdout_fidelity_pruned
    if ft.bn_stats:
        ft.bn_stats_reason = (f"--bn-stats {config.bn_stats}" if config.bn_stats else
                              f"{n_train} training samples {'<' if ft.bn_stats == 'frozen' else '>='} "
                              f"{BN_FREEZE_BELOW}")
    if ft.best_epoch:
        result.model, result.fidelity = tuned, fid
    else:
        warn(not_improved_text(ft.to_json()))
    return ft, 0


def _training_data(original: onnx.ModelProto, calib, hold: np.ndarray, options, warn):
    """(the training data, its sample indices or None for all): ``--train``, else the calibration data without
    the hold-out (said through ``warn``: it is small)."""
    train = extra_data_for(options.recovery.train, original, options.data)
    if train is not None:
        return train, None
    train_idx = None
    if len(hold) < calib.n_samples:  # a real split: the hold-out stays unseen by training
        train_idx = np.setdiff1d(np.arange(calib.n_samples), hold)
    n_train = calib.n_samples if train_idx is None else len(train_idx)
    warn(f"fine-tuning on {n_train} calibration samples" + (" (the hold-out left out)" if train_idx is not None
                                                             else "")
         + ": a few hundred samples will overfit; give more with --train DIR")
    return calib, train_idx
