"""`onnx-cprune finetune pruned.onnx out.onnx --train DIR [--teacher original.onnx] [--eval DIR]`: fine-tune
any ONNX model through the PyTorch bridge, on its own (``tuning.finetune_model``, the code
`prune --finetune-epochs` runs), write the same graph with the new weights, report before/after.

Under torchrun (``bridge.distributed.joined``) every rank runs this same function: each trains on its shard,
only rank 0 evaluates, prints and writes (``DistContext.main_only``); a failure on one rank stops all ranks and
nothing is written. Exit codes as `prune`: 2 bad input, 4 fine-tuning failed (nothing written), 130 interrupted.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import replace

from .. import pipeline
from ..errors import InputError
from ..options import DataOptions, FinetuneConfig, OutputOptions, RunOptions

FINETUNE_METADATA_KEY = "onnx_consensus.finetune"


def _config(args) -> FinetuneConfig:
    """The FinetuneConfig of the flags; ``--finetune-epochs`` defaults to the dataclass's (1) here, not to
    prune's 0 ("no fine-tuning")."""
    config = FinetuneConfig.from_args(args)
    if not hasattr(args, "finetune_epochs"):
        config = replace(config, epochs=FinetuneConfig.epochs)
    return config


def _check_teacher(student, teacher) -> None:
    """The teacher must take the student's inputs (by name) and give its first output's class count."""
    s_in = {i.name for i in student.graph.input} - {t.name for t in student.graph.initializer}
    t_in = {i.name for i in teacher.graph.input} - {t.name for t in teacher.graph.initializer}
    if s_in != t_in:
        raise InputError(f"--teacher takes inputs {sorted(t_in)} but the model takes {sorted(s_in)}: "
                         "the teacher must be the model the input was pruned from")
    if teacher.graph.output[0].name != student.graph.output[0].name:
        raise InputError(f"--teacher's first output is {teacher.graph.output[0].name!r}, the model's is "
                         f"{student.graph.output[0].name!r}: the teacher must be the model the input was pruned from")


def _metric(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _summary(info: dict, source_path: str, out_path: str) -> str:
    lines = [f"Fine-tuned {source_path} ({info['mode']}, {info['epochs']} epoch(s), {info['train_samples']} "
             f"training samples, {info['processes']} process(es)): {info['images_seen']} images in "
             f"{info['seconds']:.1f} s"]
    if info.get("metric_before") is not None:
        orig = f", original {_metric(info['metric_original'])}" if info.get("metric_original") is not None else ""
        lines.append(f"{info['metric']} on {info['eval']}: before {_metric(info['metric_before'])}, after "
                     f"{_metric(info['metric_after'])} (best epoch {info['best_epoch']}){orig}")
    for h in info["history"]:
        lines.append(f"  epoch {h['epoch']}: loss {h['loss']:.4f}, {info['metric']} {_metric(h['metric'])}, "
                     f"{h['seconds']:.1f} s")
    lines.append(f"\nWrote {out_path}")
    return "\n".join(lines)


def _write(model, out_path: str, info: dict, report_path: str | None, check_feed, external: bool, threads) -> None:
    """Rank 0 (or the only process): stamp, write the model atomically (checked), then the report."""
    from ..io import save_model_atomic

    keep = [p for p in model.metadata_props if p.key != FINETUNE_METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    compact = {k: info[k] for k in ("mode", "epochs", "train_samples", "metric", "metric_before", "metric_after",
                                    "best_epoch", "processes")}
    model.metadata_props.add(key=FINETUNE_METADATA_KEY, value=json.dumps(compact, sort_keys=True))
    try:
        save_model_atomic(model, out_path, check_feed, threads=threads, external_data=external)
    except OSError as exc:
        raise InputError(f"cannot write {out_path}: {exc.strerror or exc}") from None
    if report_path:
        pipeline._write_report({**info, "output": out_path}, report_path)


def cmd_finetune(args) -> int:
    from ..recover import require_torch

    require_torch()
    from ..bridge.distributed import joined
    from ..graph.precision import is_bfloat16
    from ..runtime import provider_names, resolve_providers, using_providers
    from ..tuning import finetune_model

    config = _config(args)
    run = RunOptions.from_args(args)
    data_opts = DataOptions.from_args(args)
    report_path = OutputOptions.from_args(args).report
    source = pipeline.open_model(args.input)
    out_path = pipeline.check_output(args.output, source)
    if is_bfloat16(source.model):
        raise InputError("fine-tuning a bfloat16 model is not supported: convert it to float32 first")
    teacher = None
    if args.teacher:
        if os.path.abspath(args.teacher) == out_path:
            raise InputError("the output path is the teacher model; choose another path")
        teacher = pipeline.open_model(args.teacher).model
        _check_teacher(source.model, teacher)
    train = pipeline._calibration(args.train, source.model, data_opts)
    eval_data = None if args.eval is None else pipeline._calibration(
        args.eval, source.model, replace(data_opts, labels=None, max_samples=None))
    check_feed = {k: v[:1] for k, v in next(train.batches(1)).items()}
    with joined(config.device) as ctx:
        main = ctx is None or ctx.is_main
        cuda_rank = ctx is not None and ctx.device.type == "cuda"
        providers = resolve_providers(run.providers, device_id=ctx.device.index if cuda_rank else None)
        with using_providers(providers):
            model, info = finetune_model(source.model, train, config=config, teacher=teacher, eval_data=eval_data,
                                         threads=run.threads, progress=run.progress and main, dist=ctx)
            info.update(input=source.path, input_sha256=source.sha256, teacher=args.teacher,
                        device=str(ctx.device) if ctx is not None else config.device, amp=config.amp,
                        providers=provider_names(providers), options=config.to_flags())
            write_args = (model, out_path, info, report_path, check_feed, source.external, run.threads)
            if ctx is None:
                _write(*write_args)
            else:
                ctx.main_only(_write, *write_args)
    if main:
        print(_summary(info, args.input, out_path))
        if report_path:
            print(f"Wrote report {report_path}")
    sys.stdout.flush()
    return 0
