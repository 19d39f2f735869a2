"""`onnx-cprune finetune pruned.onnx out.onnx --train DIR [--teacher original.onnx] [--eval DIR]`: fine-tune
any ONNX model through the PyTorch bridge, on its own (``finetune.job.finetune_model``, the code
`prune --finetune-epochs` runs), write the same graph with the new weights, report before/after.

Under torchrun (``bridge.distributed.joined``) every rank runs this same function: each trains on its shard,
only rank 0 evaluates, prints and writes (``DistContext.main_only``); a failure on one rank stops all ranks and
nothing is written. Exit codes as `prune`: 2 bad input, 4 fine-tuning failed (nothing written), 130 interrupted.
"""
from __future__ import annotations

import sys
from dataclasses import replace

from ..finetune import command
from ..finetune.results import CommandFinetuneReport
from ..options import DataOptions, FinetuneConfig, OutputOptions, RunOptions

def _config(args) -> FinetuneConfig:
    """The FinetuneConfig of the flags; ``--finetune-epochs`` defaults to the dataclass's (1) here, not to
    prune's 0 ("no fine-tuning")."""
    config = FinetuneConfig.from_args(args)
    if not hasattr(args, "finetune_epochs"):
        config = replace(config, epochs=FinetuneConfig.epochs)
    return config


def _metric(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _summary(info: CommandFinetuneReport, source_path: str, out_path: str) -> str:
    lines = [f"Fine-tuned {source_path} ({info.mode}, {info.epochs} epoch(s), {info.train_samples} "
             f"training samples, {info.processes} process(es)): {info.images_seen} samples seen in "
             f"{info.seconds:.1f} s"]
    if info.metric_before is not None:
        orig = f", original {_metric(info.metric_original)}" if info.metric_original is not None else ""
        lines.append(f"{info.metric} on {info.eval}: before {_metric(info.metric_before)}, after "
                     f"{_metric(info.metric_after)} (best epoch {info.best_epoch}){orig}")
    for h in info.history:
        lines.append(f"  epoch {h['epoch']}: loss {h['loss']:.4f}, {info.metric} {_metric(h['metric'])}, "
                     f"{h['seconds']:.1f} s")
    lines.append(f"\nWrote {out_path}")
    return "\n".join(lines)


def cmd_finetune(args) -> int:
    report_path = OutputOptions.from_args(args).report
    info, main, out_path = command.run(args.input, args.output, args.train, config=_config(args),
                                       run=RunOptions.from_args(args), data=DataOptions.from_args(args),
                                       eval_path=args.eval, teacher_path=args.teacher, report_path=report_path)
    if main:
        print(_summary(info, args.input, out_path))
        if report_path:
            print(f"Wrote report {report_path}")
    sys.stdout.flush()
    return 0
