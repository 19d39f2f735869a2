"""One prune run, the same for the command (`onnx-cprune prune`) and the Python API (``prune``):

    source = open_model("in.onnx")                   # or an onnx.ModelProto
    out = check_output("out.onnx", source)           # fail early: bad output path, data file clash
    outcome = run(source, "calib/", Options(...))    # load data, prune, latency, fine-tune, report data
    written = write(outcome, out)                    # atomic, checked write of the model and the report

``run`` does everything between reading and writing: the float32 shadow of a bfloat16 model (the removals
found on it applied back to the bfloat16 original), ``--plan`` replay, the removal schedule
(``pruner.prune``), latency before and after, fine-tuning (the pruned model kept when it fails, exit 4),
and the report. A failure midway raises the failure itself, unless ``output.keep_partial``: then the
Outcome holds the partial result (status "partial", the failure's exit code) for ``write``.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from .bench import measure_latency, random_feed
from .data import ImageOptions, load_calibration
from .errors import FinetuneError, InputError, PruneFailed
from .graph.blocks import find_blocks
from .graph.flops import count_cost
from .graph.ir import load_model, load_model_and_layout
from .graph.precision import float32_shadow, is_bfloat16
from .graph.surgery import remove_blocks
from .io import check_output_path, save_model_atomic
from .metrics.presets import check_names
from .options import (CriterionOptions, DataOptions, FinetuneConfig, Options, OutputOptions, RecoveryOptions,
                      RunOptions, TargetOptions)
from .pruner import PruneResult
from .pruner import prune as schedule
from .report import build_report, sha256_file, stamp

log = logging.getLogger("onnx_consensus")
__all__ = ["Source", "Outcome", "Written", "open_model", "check_output", "run", "write", "prune", "inspect"]


@dataclass
class Source:
    """The input model: ``path`` (None when given in memory), ``external`` whether its weights are in an
    external-data file (then written the same way), its file's ``sha256``."""

    model: onnx.ModelProto
    path: str | None = None
    external: bool = False
    sha256: str | None = None


@dataclass
class Outcome:
    """What a run produced.

    model: the model to write (the bfloat16 original with the removals for a bfloat16 input; fine-tuned
        when fine-tuning succeeded); ``write`` says whether it is written at all.
    result: the schedule's PruneResult (its ``model`` is ``model``); the partial one after a failure.
    report: the JSON report (``report.build_report``) with ``seconds`` (and ``partial``/``error``).
    latency: {batch size: before/after ms} or None; finetune: the fine-tuning info or None.
    exit_code / status: 0 "done" or "nothing removed"; 4 "finetune failed"; 130 "finetune interrupted";
        the failure's code with "partial" (then ``failure`` is the PruneFailed).
    check_feed: one sample for the written model's onnxruntime check (None for bfloat16, which it cannot run).
    warnings: what the run warned about (also logged).
    """

    model: onnx.ModelProto | None
    result: PruneResult
    report: dict
    options: Options
    latency: dict | None = None
    finetune: dict | None = None
    exit_code: int = 0
    status: str = "done"
    write: bool = False
    failure: PruneFailed | None = None
    check_feed: dict[str, np.ndarray] | None = None
    external: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def removed_ids(self) -> list[str]:
        return self.result.removed_ids


@dataclass
class Written:
    """Paths ``write`` wrote (None: not written)."""

    model: str | None = None
    report: str | None = None


def open_model(path: str | os.PathLike) -> Source:
    """Load a model file (external-data weights memory-mapped, not read) with its sha256."""
    model, external = load_model_and_layout(path)
    return Source(model, os.path.abspath(os.fspath(path)), external, sha256_file(path))


def check_output(out_path: str | os.PathLike, source: Source) -> str:
    """The absolute output path, or InputError: missing directory, the input itself, or an output whose
    external-data file (``<output>.data``) is one the input reads its weights from."""
    path = check_output_path(out_path, source.path)
    data_out = path + ".data"
    if source.external and os.path.exists(data_out):
        for t in source.model.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location" and os.path.exists(entry.value) and os.path.samefile(entry.value, data_out):
                    raise InputError(f"the output's weights would go to {data_out}, which holds the input's "
                                     "weights; choose another output name")
    return path


class _AsFloat32:
    """Calibration data loaded for a bfloat16 model, feeding its float32 shadow: bfloat16 arrays cast."""

    def __init__(self, data):
        self._data = data

    def __getattr__(self, name):
        return getattr(self._data, name)

    def batches(self, *args, **kwargs):
        for feeds in self._data.batches(*args, **kwargs):
            yield {k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in feeds.items()}


def _calibration(data, model: onnx.ModelProto, opts: DataOptions):
    """``data`` as CalibrationData for ``model`` as given (loaded when a path, with ``opts``); data for
    bfloat16 inputs is cast to float32 for the shadow, the same whether the API or the command loaded it."""
    if isinstance(data, (str, os.PathLike)):
        data = load_calibration(data, model, labels=opts.labels, image_options=_image_options(opts),
                                strict=opts.strict, max_samples=opts.max_samples)
    if any(getattr(s.dtype, "name", str(s.dtype)) == "bfloat16" for s in getattr(data, "specs", ())):
        return _AsFloat32(data)
    return data


def _image_options(opts: DataOptions) -> ImageOptions:
    kw = {"layout": opts.layout}
    if opts.image_size:
        kw["size"] = opts.image_size
    if opts.mean:
        kw["mean"] = opts.mean
    if opts.std:
        kw["std"] = opts.std
    return ImageOptions(**kw)


def _extra_data(path, model: onnx.ModelProto, opts: DataOptions):
    """Training / evaluation data: a path (loaded with ``opts.strict`` and the image options of the
    calibration data, for image folders) or CalibrationData."""
    if path is None or not isinstance(path, (str, os.PathLike)):
        return path
    return load_calibration(path, model, image_options=_image_options(opts), strict=opts.strict)


def _warn(warnings: list[str], message: str) -> None:
    log.warning("%s", message)
    warnings.append(message)


def run(model: onnx.ModelProto | Source | str | os.PathLike, data, options: Options | None = None) -> Outcome:
    """Prune ``model`` (a ModelProto, a Source or a path; never modified) scored on ``data`` (a
    CalibrationData, or a path loaded with ``options.data``), as ``options`` say. Raises InputError /
    TargetError / the failure of a run that failed midway (KeyboardInterrupt, an onnxruntime error),
    unless ``options.output.keep_partial``: then the Outcome has status "partial"."""
    t_start = time.perf_counter()
    options = options or Options()
    source = model if isinstance(model, Source) else (
        open_model(model) if isinstance(model, (str, os.PathLike)) else Source(model))
    ft = options.finetune
    finetuning = ft is not None and ft.epochs > 0
    between = options.recovery.between
    if finetuning or between:
        from .recover import require_torch

        require_torch()
    check_names(options.criterion.metrics)
    if options.run.batch_size < 1:
        raise InputError("--batch-size must be >= 1")
    warnings: list[str] = []
    original = model = source.model
    bfloat16 = is_bfloat16(original)
    if bfloat16:
        if finetuning or between:
            raise InputError("fine-tuning a bfloat16 model is not supported (onnxruntime's CPU provider cannot "
                             "run it as the teacher): prune without fine-tuning, or convert it to float32 first")
        _warn(warnings, "bfloat16 model: onnxruntime's CPU provider cannot run it, so a float32 copy is scored and "
                        "pruned; the output is written in bfloat16 (checked by onnx.checker only; no latency)")
        model = float32_shadow(original)
    data = _calibration(data, original, options.data)
    hook = None
    if between:
        from .recover import between_removals

        train = _extra_data(options.recovery.train, model, options.data) or data
        hook = between_removals(model, train, config=replace(ft or FinetuneConfig(), epochs=1), steps=between)
    report_options = {"input": source.path, "calib": getattr(data, "source", None), **options.to_flags()}

    def report_of(result, **kw) -> dict:
        return build_report(result, options=report_options, input_path=source.path, input_sha256=source.sha256, **kw)

    def on_original(result: PruneResult) -> onnx.ModelProto:
        """The pruned model to write: for a bfloat16 input, the removals applied to the bfloat16 original."""
        if not bfloat16:
            return result.model
        return remove_blocks(original, [r.block for r in result.removals]) if result.removals else original

    check_feed = None if bfloat16 else {k: v[:1] for k, v in next(data.batches(1)).items()}
    failure = None
    try:
        result = schedule(model, data, criterion=options.criterion, target=options.target, run=options.run,
                          between=hook)
    except PruneFailed as exc:
        failure = exc
    if failure is not None:
        if not options.output.keep_partial:
            raise failure.__cause__
        partial = failure.partial
        report = report_of(partial)
        report.update(partial=True, error=str(failure), seconds=round(time.perf_counter() - t_start, 2))
        pruned = on_original(partial) if partial.removals else None
        partial.model = pruned if pruned is not None else partial.model
        return Outcome(pruned, partial, report, options, exit_code=failure.exit_code, status="partial",
                       write=bool(partial.removals), failure=failure, check_feed=check_feed,
                       external=source.external, warnings=warnings)

    result.model = on_original(result)
    latency = None
    if result.removals and options.output.latency and not bfloat16:
        latency = _latency(model, result.model, next(data.batches(options.run.batch_size)), options)
    finetune_info, exit_code, status = None, 0, "done" if result.removals else "nothing removed"
    if finetuning and result.removals:
        finetune_info, exit_code = _finetune(model, result, data, options, warnings)
        if exit_code:
            status = "finetune interrupted" if exit_code == 130 else "finetune failed"
    report = report_of(result, latency=latency, finetune=finetune_info)
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    return Outcome(result.model, result, report, options, latency=latency, finetune=finetune_info,
                   exit_code=exit_code, status=status, write=bool(result.removals) or options.output.force_write,
                   check_feed=check_feed, external=source.external, warnings=warnings)


_run = run  # ``prune`` has a keyword named ``run``


def _latency(model: onnx.ModelProto, pruned: onnx.ModelProto, sample, options: Options) -> dict:
    """onnxruntime latency of the original and the pruned model, alternated, at batch 1 and the run's."""
    latency = {}
    for bs in sorted({1, options.run.batch_size}):
        feed = random_feed(model, bs, sample)
        before, after = measure_latency([model, pruned], feed, runs=options.output.latency_runs,
                                        threads=options.run.threads or os.cpu_count())
        latency[str(bs)] = {"before_ms": before.median_ms, "after_ms": after.median_ms,
                            "before_p90_ms": before.p90_ms, "after_p90_ms": after.p90_ms,
                            "threads": before.threads, "opt_level": before.opt_level, "runs": before.runs,
                            "spinning": before.spinning}
    return latency


def _finetune(original: onnx.ModelProto, result: PruneResult, calib, options: Options,
              warnings: list[str]) -> tuple[dict, int]:
    """Fine-tune ``result.model`` in place; on failure keep the pruned model (exit 4; 130 when interrupted
    with keep_partial)."""
    from .recover import finetune_pruned

    rec = options.recovery
    train = _extra_data(rec.train, original, options.data)
    if train is None:
        train = calib
        _warn(warnings, f"fine-tuning on the calibration data ({calib.n_samples} samples): a few hundred samples "
                        "will overfit; give more with --train DIR")
    eval_data = _extra_data(rec.eval, original, options.data)
    config = options.finetune
    info = {"mode": "supervised" if train.labels is not None else "distillation", "epochs": config.epochs,
            "train_samples": train.n_samples, "eval": getattr(eval_data, "source", None)}
    try:
        tuned, res, before, after, original_metric = finetune_pruned(
            original, result.model, train, config=config, eval_data=eval_data, threads=options.run.threads,
            progress=options.run.progress)
    except FinetuneError as exc:
        info["error"] = str(exc)
        return info, exc.exit_code
    except Exception as exc:  # e.g. onnxruntime failing on the teacher or the evaluation midway
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        info["error"] = f"fine-tuning failed: {type(exc).__name__}: {first}"
        return info, FinetuneError.exit_code
    except KeyboardInterrupt:
        if not options.output.keep_partial:
            raise
        info["error"] = "fine-tuning interrupted (--keep-partial)"
        return info, 130
    result.model = tuned
    info.update(metric_original=original_metric, metric_before=before, metric_after=after, best_epoch=res.best_epoch,
                images_seen=res.images_seen, seconds=round(res.seconds, 2), history=res.history,
                metric="accuracy" if (eval_data is not None and eval_data.labels is not None) else "agreement")
    return info, 0


def write(outcome: Outcome, out_path: str | os.PathLike) -> Written:
    """Write the outcome's model to ``out_path`` when it is to be written (stamped with the report's
    provenance; atomic, checked by onnx.checker and one onnxruntime run), then the report to
    ``options.output.report`` if set (its ``output`` says where the model went, or None)."""
    out_path = os.fspath(out_path)
    written = Written()
    report = outcome.report
    report["output"] = None
    if outcome.write and outcome.model is not None:
        stamp(outcome.model, report)
        try:
            save_model_atomic(outcome.model, out_path, outcome.check_feed, threads=outcome.options.run.threads,
                              external_data=outcome.external)
        except OSError as exc:
            raise InputError(f"cannot write {out_path}: {exc.strerror or exc}") from None
        written.model = report["output"] = out_path
    if outcome.options.output.report:
        written.report = _write_report(report, outcome.options.output.report)
    return written


def _write_report(report: dict, path: str) -> str:
    import json

    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, default=_jsonable)
    os.replace(tmp, path)
    return path


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def prune(model: onnx.ModelProto | str | os.PathLike, data, *, criterion: CriterionOptions | None = None,
          target: TargetOptions | None = None, run: RunOptions | None = None,
          finetune: FinetuneConfig | None = None, recovery: RecoveryOptions | None = None,
          output: OutputOptions | None = None, data_options: DataOptions | None = None) -> Outcome:
    """The public API: the same run as `onnx-cprune prune` (``run`` with the option groups as keywords).
    ``outcome.model`` is the pruned model, ``outcome.result`` the PruneResult (removals, rounds, MACs,
    fidelity), ``outcome.report`` what ``--report`` writes. Fine-tunes only when ``finetune`` is given."""
    options = Options(data=data_options or DataOptions(), run=run or RunOptions(), target=target or TargetOptions(),
                      criterion=criterion or CriterionOptions(), finetune=finetune,
                      recovery=recovery or RecoveryOptions(), output=output or OutputOptions())
    return _run(model, data, options)


def inspect(path: str | os.PathLike, *, unit: str = CriterionOptions.unit,
            input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """The removable blocks of a model file, without running it: {model, macs, params, unit, blocks (each
    with ``macs_share``), not_removable, notes}."""
    model = load_model(path)
    cost = count_cost(model, input_shapes or {})
    report = find_blocks(model, macs_per_node=cost.macs_per_node, unit=unit)
    total = cost.total_macs
    blocks = []
    for b in report.blocks:
        d = b.to_json()
        d["macs_share"] = (b.macs / total) if (b.macs is not None and total) else None
        blocks.append(d)
    return {"model": os.fspath(path), "macs": total, "params": cost.params, "unit": unit, "blocks": blocks,
            "not_removable": [n.to_json() for n in report.not_removable], "notes": list(report.notes)}
