"""The `finetune` command's job: fine-tune any ONNX model through the PyTorch bridge on its own
(``job.finetune_model``, the code `prune --finetune-epochs` runs) and write the same graph with the new
weights, on one process or on every rank under torchrun (``bridge.distributed.joined``: each rank trains on its
shard, only rank 0 evaluates and writes, a failure on one rank stops all ranks and nothing is written).
The CLI (``cli/finetune.py``) parses the flags, calls ``run`` and prints the summary.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np

from .. import pipeline
from ..data.for_model import calibration_for
from ..errors import InputError
from ..options import DataOptions, FinetuneConfig, RunOptions
from .checks import check_teacher, require_torch
from .results import CommandFinetuneReport

FINETUNE_METADATA_KEY = "onnx_consensus.finetune"

__all__ = ["FINETUNE_METADATA_KEY", "run"]


def _write(model, out_path: str, info: CommandFinetuneReport, report_path: str | None, check_feed, external: bool,
           threads) -> None:
    """Rank 0 (or the only process): stamp, write the model atomically (checked), then the report."""
    from ..io import save_model_atomic

    keep = [p for p in model.metadata_props if p.key != FINETUNE_METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    model.metadata_props.add(key=FINETUNE_METADATA_KEY, value=json.dumps(info.stamp(), sort_keys=True))
    try:
        save_model_atomic(model, out_path, check_feed, threads=threads, external_data=external)
    except OSError as exc:
        raise InputError(f"cannot write {out_path}: {exc.strerror or exc}") from None
    if report_path:
        pipeline.write_report({**info.to_json(), "output": out_path}, report_path)


def run(input_path: str, output_path: str, train_path, *, config: FinetuneConfig, run: RunOptions,
        data: DataOptions, eval_path=None, teacher_path: str | None = None,
        report_path: str | None = None) -> tuple[CommandFinetuneReport, bool, str]:
    """Fine-tune ``input_path`` on ``train_path`` and write ``output_path`` (rank 0 only under torchrun).
    Returns (info, is_main, the output's absolute path): ``info`` is the report entry; only the main process
    prints."""
    from ..bridge.distributed import joined
    from ..graph.precision import is_bfloat16
    from ..graph.quant import finetune_refusal, quantized_ops
    from ..runtime import provider_names, resolve_providers, using_providers
    from . import job

    require_torch()
    source = pipeline.open_model(input_path)
    out_path = pipeline.check_output(output_path, source)
    if is_bfloat16(source.model):
        raise InputError("fine-tuning a bfloat16 model is not supported: convert it to float32 first")
    if quantized_ops(source.model):
        raise InputError(finetune_refusal(quantized_ops(source.model)))
    teacher = None
    if teacher_path:
        if os.path.abspath(teacher_path) == out_path:
            raise InputError("the output path is the teacher model; choose another path")
        teacher = pipeline.open_model(teacher_path).model
        check_teacher(source.model, teacher)
    train = calibration_for(train_path, source.model, data)
    eval_data = None if eval_path is None else calibration_for(
        eval_path, source.model, replace(data, labels=None, max_samples=None))
    axes = train.batch_axes  # a 0-d input (a sample rate) or a state batched on axis 1: as fed
    check_feed = {k: v[:1] if np.ndim(v) and axes.get(k, 0) == 0 else v for k, v in next(train.batches(1)).items()}
    with joined(config.device) as ctx:
        main = ctx is None or ctx.is_main
        cuda_rank = ctx is not None and ctx.device.type == "cuda"
        providers = resolve_providers(run.providers, device_id=ctx.device.index if cuda_rank else None)
        with using_providers(providers):
            model, info = job.finetune_model(source.model, train, config=config, teacher=teacher,
                                             eval_data=eval_data, threads=run.threads, progress=run.progress and main,
                                             dist=ctx, report=CommandFinetuneReport)
            info.input, info.input_sha256, info.teacher = source.path, source.sha256, teacher_path
            info.device = str(ctx.device) if ctx is not None else config.device
            info.amp, info.providers, info.options = config.amp, provider_names(providers), config.to_flags()
            write_args = (model, out_path, info, report_path, check_feed, source.external, run.threads)
            if ctx is None:
                _write(*write_args)
            else:
                ctx.main_only(_write, *write_args)
    return info, main, out_path
