"""One prune run, the same for the command (`onnx-cprune prune`) and the Python API (``prune``), for every
model kind (block models; decoder LLMs with a KV cache, given as a model file or an export folder):

    source = open_model("in.onnx")                   # or an onnx.ModelProto; or a decoder's export folder
    out = check_output("out.onnx", source)           # fail early: bad output path, data file clash
    outcome = run(source, "calib/", Options(...))    # load data, prune, latency, fine-tune, report data
    written = write(outcome, out)                    # atomic, checked write of the model and the report

``run`` does everything between reading and writing. A decoder LLM (``llm.run.is_decoder``, or any export
folder) goes to ``llm.run.prune_decoder`` (calibration text; the options it cannot honour refused in one
line). A block model: the float32 shadow of a bfloat16 model (the removals found on it applied back to the
bfloat16 original), ``--plan`` replay, the removal schedule (``pruner.prune``), latency before and after,
fine-tuning (the pruned model kept when it fails, exit 4), and the report. A failure midway raises the
failure itself, unless ``output.keep_partial``: then the Outcome holds the partial result (status "partial",
the failure's exit code) for ``write``. Both kinds share ``schedule.rounds``, the Outcome, the report's
common keys, the metadata stamp (``report.stamp``) and the providers of ``--providers``.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from functools import partial

import onnx

from .batching import calibration_shapes
from .bench import LatencyChange, measure_latency, random_feed
from .data.for_model import calibration_for, extra_data_for
from .errors import InputError, PruneFailed
from .graph.flops import count_cost
from .graph.ir import interface, load_model_and_layout
from .graph.precision import float32_shadow, is_bfloat16
from .graph.quant import finetune_refusal, quantized_ops
from .graph.surgery import remove_blocks
from .graph.weights import all_tensors
from .io import check_output_path
from .memory import fit_memory
from .metrics.presets import check_names
from .options import (CriterionOptions, DataOptions, FinetuneConfig, Options, OutputOptions,
                      RecoveryOptions, RunOptions, TargetOptions, default_criterion)
from .inspection import inspect
from .outcome import DecoderRun, Outcome, Source, Written
from .pruner import PruneResult, nothing_removable
from .pruner import prune as schedule
from .report import build_report, sha256_file
from .runtime import resolve_providers, using_providers
from .writer import summary, write, write_report

log = logging.getLogger("onnx_consensus")
__all__ = ["Source", "Outcome", "DecoderRun", "Written", "open_model", "check_output", "run", "summary", "write",
           "write_report", "prune", "inspect", "Options"]


def open_model(path: str | os.PathLike, *, follow_symlinks: bool = False) -> Source:
    """Load a model file (external-data weights memory-mapped, not read) with its sha256; a folder is a decoder
    LLM's export folder (``llm.run.open_decoder``: its model file, ``follow_symlinks`` as ``--follow-symlinks``)."""
    if os.path.isdir(path):
        from .llm.run import open_decoder

        return open_decoder(path, follow_symlinks=follow_symlinks)
    model, external = load_model_and_layout(path)
    path = os.path.abspath(os.fspath(path))
    return Source(model, path, external, sha256_file(path), model_file=path)


def is_decoder_source(source: Source) -> bool:
    """Whether ``source`` is a decoder LLM with a KV cache (``llm.run.is_decoder``) or an export folder."""
    from .llm.run import is_decoder

    return source.folder or is_decoder(source.model)


def check_output(out_path: str | os.PathLike, source: Source) -> str:
    """The absolute output path, or InputError: missing directory, the input itself, or an output whose
    external-data file (``<output>.data``) is one the input reads its weights from; for a decoder's export
    folder, an output folder that exists and is not empty; for a decoder's model file, a path not ending in
    .onnx."""
    if source.folder:
        out = os.path.abspath(os.fspath(out_path))
        if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
            raise InputError(f"output folder exists and is not empty: {out}")
        return out
    if is_decoder_source(source) and not os.fspath(out_path).endswith(".onnx"):
        raise InputError("the input is a model file: give a .onnx output path (or prune the export folder)")
    path = check_output_path(out_path, source.path)
    data_out = path + ".data"
    if source.external and os.path.exists(data_out):
        for t in all_tensors(source.model):
            for entry in t.external_data:
                if entry.key == "location" and os.path.exists(entry.value) and os.path.samefile(entry.value, data_out):
                    raise InputError(f"the output's weights would go to {data_out}, which holds the input's "
                                     "weights; choose another output name")
    return path


def _warn(warnings: list[str], message: str) -> None:
    log.warning("%s", message)
    warnings.append(message)


def run(model: onnx.ModelProto | Source | str | os.PathLike, data, options: Options | None = None, *,
        progress=None) -> Outcome:
    """Prune ``model`` (a ModelProto, a Source or a path: a model file, or a decoder LLM's export folder; never
    modified) scored on ``data`` (a CalibrationData, or a path loaded with ``options.data``; for a decoder LLM
    calibration text: a path or an ``llm.text.TextData``), as ``options`` say. Raises InputError /
    TargetError / the failure of a run that failed midway (KeyboardInterrupt, an onnxruntime error),
    unless ``options.output.keep_partial``: then the Outcome has status "partial". Every onnxruntime
    session of the run uses ``options.run.providers``. progress: called with a line per removal round of a
    decoder run (block runs show progress bars with ``options.run.progress``)."""
    options = options or Options()
    if isinstance(model, (str, os.PathLike)):
        model = open_model(model, follow_symlinks=options.data.follow_symlinks)
    source = model if isinstance(model, Source) else Source(model)
    with using_providers(resolve_providers(options.run.providers)):
        if is_decoder_source(source):
            from .llm.run import prune_decoder

            return prune_decoder(source if isinstance(model, Source) else model, data, options, progress=progress)
        return _run_blocks(source, data, options)


def _resolved(options: Options) -> tuple[Options, dict, bool]:
    """(options with the default ``--metrics`` filled in, the report's criterion entry, whether the pruned
    model is fine-tuned); InputError for bad metric names, --device/--amp, --batch-size."""
    ft = options.finetune
    finetuning = ft is not None and ft.epochs > 0
    between = options.recovery.between
    if finetuning or between:
        from .finetune import check_config, require_torch

        require_torch()
        check_config(ft if finetuning else replace(ft or FinetuneConfig(), epochs=1))  # bad --device/--amp: now
    check_names(options.criterion.metrics)
    default_for = None  # which default --metrics took, when not given: the benchmark's best for this condition
    if options.criterion.metrics is None:
        tuned = finetuning or bool(between)
        default_for = "with fine-tuning" if tuned else "without fine-tuning"
        options = replace(options, criterion=replace(options.criterion, metrics=default_criterion(tuned)))
    if options.run.batch_size < 1:
        raise InputError("--batch-size must be >= 1")
    return options, {"metrics": list(options.criterion.metrics), "default": default_for}, finetuning


def _scored_model(original: onnx.ModelProto, options: Options, finetuning: bool, warnings: list[str]):
    """The model scored and pruned: ``original``, or the float32 shadow of a bfloat16 one; InputError for
    what a bfloat16 or quantized model cannot do (fine-tuning, --quantize)."""
    between = options.recovery.between
    model = original
    if is_bfloat16(original):
        if finetuning or between:
            raise InputError("fine-tuning a bfloat16 model is not supported (onnxruntime's CPU provider cannot "
                             "run it as the teacher): prune without fine-tuning, or convert it to float32 first")
        if options.output.quantize:
            raise InputError("--quantize needs a float32 model: onnxruntime cannot run a bfloat16 one")
        _warn(warnings, "bfloat16 model: onnxruntime's CPU provider cannot run it, so a float32 copy is scored and "
                        "pruned; the output is written in bfloat16 (checked by onnx.checker only; no latency)")
        model = float32_shadow(original)
    if (finetuning or between) and quantized_ops(original):
        raise InputError(finetune_refusal(quantized_ops(original)))
    return model


def _fitted(model: onnx.ModelProto, data, options: Options, warnings: list[str]) -> tuple[Options, int | None, dict]:
    """(options with the batch that fits --max-memory and the calibration data's input shapes, the model's
    fixed batch or None, the memory estimate); each change said as a warning."""
    fixed = data.fixed_batch
    if fixed:
        _warn(warnings, f"the model has a fixed batch of {fixed}: inference runs {fixed} sample(s) at a time"
                        + (" (a short last batch is padded, the padding ignored)" if fixed > 1 else "")
                        + (f"; --batch-size {options.run.batch_size} is not used" if options.run.batch_size != fixed
                           else ""))
    batch, note, memory = fit_memory(model, data, options.run, options.criterion)  # before any inference
    if note:
        _warn(warnings, note)
        options = replace(options, run=replace(options.run, batch_size=batch))
    shapes = {} if options.run.input_shapes else calibration_shapes(interface(model)[0], data)
    if shapes:
        try:
            count_cost(model, shapes)
        except InputError as exc:  # e.g. a dim the model writes as -1: MACs stay unknown, said why
            _warn(warnings, f"MACs not counted at the calibration data's shapes: {exc}")
            shapes = {}
    if shapes:
        options = replace(options, run=replace(options.run, input_shapes=shapes))
        _warn(warnings, "MACs and latency at the calibration data's shapes (first sample): "
                        + ", ".join(f"{k}:{'x'.join(map(str, v)) or 'scalar'}" for k, v in shapes.items())
                        + " (--input-shape NAME:1x3x224x224 to choose others)")
    return options, fixed, memory


def _on_original(original: onnx.ModelProto, result: PruneResult, bfloat16: bool) -> onnx.ModelProto:
    """The pruned model to write: for a bfloat16 input, the removals applied to the bfloat16 original."""
    if not bfloat16:
        return result.model
    return remove_blocks(original, [r.block for r in result.removals]) if result.removals else original


def _run_blocks(source: Source, data, options: Options) -> Outcome:
    """``run`` for a block model, inside the run's providers."""
    t_start = time.perf_counter()
    options, criterion, finetuning = _resolved(options)
    warnings: list[str] = []
    original = source.model
    model = _scored_model(original, options, finetuning, warnings)
    bfloat16 = model is not original
    nothing = _no_removable_block(source, model, options)
    if nothing is not None and not options.output.quantize:  # said before any data is read or inference runs
        return nothing
    data = calibration_for(data, original, options.data)
    options, fixed, memory = _fitted(model, data, options, warnings)
    hook = None
    if options.recovery.between:
        from .finetune.between import between_removals

        train = extra_data_for(options.recovery.train, model, options.data) or data
        hook = between_removals(model, train, config=replace(options.finetune or FinetuneConfig(), epochs=1),
                                steps=options.recovery.between)
    report_of = partial(build_report, options={"input": source.path, "calib": data.source,
                                               **options.to_flags()},
                        input_path=source.path, input_sha256=source.sha256, criterion=criterion)
    check_feed = None if bfloat16 else next(data.batches(1))
    scoring, ft = options.criterion, options.finetune
    if scoring.feature and finetuning and ft.feature_mse > 0 and _output_only(scoring.metrics):
        scoring = replace(scoring, feature=None)  # --feature is the fine-tuning's feature MSE tensor, not scored
    failure = None
    try:
        if options.target.target_latency is not None or options.target.target_latency_ms is not None:
            from .latency_target import prune_to_latency

            result, latency_target = prune_to_latency(model, data, replace(options, criterion=scoring), fixed=fixed,
                                                      between=hook, axes=data.batch_axes)
        else:
            result, latency_target = schedule(model, data, criterion=scoring, target=options.target,
                                              run=options.run, between=hook), None
    except PruneFailed as exc:
        failure = exc
    if failure is not None:
        if not options.output.keep_partial:
            raise failure.__cause__
        return _partial(failure, report_of, original, bfloat16, options, t_start,
                        Outcome(None, failure.partial, {}, options, check_feed=check_feed, external=source.external,
                                warnings=warnings))
    result.model = _on_original(original, result, bfloat16)
    outcome = Outcome(result.model, result, {}, options, check_feed=check_feed, external=source.external,
                      warnings=warnings)
    _complete(outcome, model, data, report_of, latency_target, fixed=fixed, bfloat16=bfloat16,
              finetuning=finetuning)
    outcome.report["seconds"] = round(time.perf_counter() - t_start, 2)
    keep = bool(result.removals) and not _too_small(result, options, warnings)
    if result.removals and not keep:
        outcome.status = "saves too little"
    outcome.report.update(small_saving=result.small_saving, memory=memory)
    outcome.model = result.model
    outcome.write = keep or options.output.force_write or bool(options.output.quantize)
    return outcome


def _partial(failure: PruneFailed, report_of, original, bfloat16: bool, options: Options, t_start: float,
             outcome: Outcome) -> Outcome:
    """The Outcome of a run that failed midway with --keep-partial: the removals done, status "partial"."""
    partial_result = failure.partial
    report = report_of(partial_result)
    report.update(partial=True, error=str(failure), seconds=round(time.perf_counter() - t_start, 2))
    pruned = _on_original(original, partial_result, bfloat16) if partial_result.removals else None
    partial_result.model = pruned if pruned is not None else partial_result.model
    outcome.model, outcome.report, outcome.exit_code, outcome.status = pruned, report, failure.exit_code, "partial"
    outcome.write, outcome.failure = bool(partial_result.removals), failure
    return outcome


def _complete(outcome: Outcome, model: onnx.ModelProto, data, report_of, latency_target, *, fixed, bfloat16: bool,
              finetuning: bool) -> None:
    """After the schedule: latency, fine-tuning, the report, the HTML report's removal curve, --quantize."""
    result, options = outcome.result, outcome.options
    if result.removals and options.output.latency and not bfloat16:
        outcome.latency = _latency(model, result.model, next(data.batches(options.run.batch_size)), options,
                                   fixed=fixed, axes=data.batch_axes)
    outcome.status = "done" if result.removals else "nothing removed"
    if finetuning and result.removals:
        outcome.finetune, outcome.exit_code = _finetune(model, result, data, options, outcome.warnings)
        if outcome.exit_code:
            outcome.status = "finetune interrupted" if outcome.exit_code == 130 else "finetune failed"
    report = outcome.report = report_of(result, latency=outcome.latency, finetune=outcome.finetune)
    report["latency_target"] = latency_target
    if (options.output.report or "").endswith(".html") and result.removals:  # the HTML report's removal curve
        from .trajectory import run_curve

        report["curve"] = run_curve(model, result, data, options, fixed=fixed)
    if options.output.quantize:  # the written model becomes the pruned (fine-tuned) model quantized
        from .variants import quantize_run

        result.model, report["quantize"] = quantize_run(model, result, data, options, fixed=fixed,
                                                        eval_data=extra_data_for(options.recovery.eval, model,
                                                                              options.data))


_run = run  # ``prune`` has a keyword named ``run``


def _output_only(metrics) -> bool:
    """Every criterion of ``metrics`` (names or presets) compares the graph outputs only."""
    from .metrics import get_metric
    from .metrics.presets import split_names

    return all(t == "output" or (t != "paper" and get_metric(t).output) for t in split_names(metrics))


def _too_small(result: PruneResult, options: Options, warnings: list[str]) -> bool:
    """Whether removals that save almost no MACs (``pruner.saving_note``) are left unwritten: yes with no
    target (the run chose them), else (``--remove``, ``--target-flops``, ``--plan``) a warning only."""
    if not result.small_saving:
        return False
    t = options.target
    if t.remove is None and t.target_flops is None and not t.plan:
        return True
    _warn(warnings, f"{result.small_saving}; remove other blocks (see `onnx-cprune inspect`) to save compute")
    return False


def _no_removable_block(source: Source, model: onnx.ModelProto, options: Options) -> Outcome | None:
    """The run's Outcome when ``model`` has no removable block (README's exit codes: 0, nothing written
    unless --force-write), found before any data is loaded or any inference runs; None otherwise."""
    if options.target.plan:
        return None  # a plan names blocks: the schedule checks them
    result = nothing_removable(model, source.model, unit=options.criterion.unit,
                               input_shapes=options.run.input_shapes)
    if result is None:
        return None
    report = build_report(result, options={"input": source.path, **options.to_flags()}, input_path=source.path,
                          input_sha256=source.sha256)
    report["seconds"] = 0.0
    return Outcome(source.model, result, report, options, status="nothing removed",
                   write=options.output.force_write, check_feed=None, external=source.external)


def _latency(model: onnx.ModelProto, pruned: onnx.ModelProto, sample, options: Options, *,
             fixed: int | None = None, axes: dict | None = None) -> dict:
    """onnxruntime latency of the original and the pruned model, alternated, at batch 1 and the run's (only
    at the model's fixed batch, when it has one); inputs tiled from ``sample`` (a calibration batch) along
    their batch ``axes``."""
    latency = {}
    for bs in ([fixed] if fixed else sorted({1, options.run.batch_size})):
        feed = random_feed(model, bs, sample, axes=axes)
        before, after = measure_latency([model, pruned], feed, runs=options.output.latency_runs,
                                        threads=options.run.threads or os.cpu_count())
        latency[str(bs)] = LatencyChange(before, after).to_json()
    return latency


def _finetune(original: onnx.ModelProto, result: PruneResult, calib, options: Options,
              warnings: list[str]) -> tuple[dict, int]:
    """Fine-tune ``result.model`` (``finetune.after_prune``: the best of {pruned, each epoch} kept, the pruned
    model on failure, exit 4; 130 when interrupted with keep_partial); returns (the report entry, exit code)."""
    from .finetune.after_prune import after_prune

    info, code = after_prune(original, result, calib, options, lambda message: _warn(warnings, message))
    return info.to_json(), code


def prune(model: onnx.ModelProto | str | os.PathLike, data, *, criterion: CriterionOptions | None = None,
          target: TargetOptions | None = None, run: RunOptions | None = None,
          finetune: FinetuneConfig | None = None, recovery: RecoveryOptions | None = None,
          output: OutputOptions | None = None, data_options: DataOptions | None = None) -> Outcome:
    """The public API: the same run as `onnx-cprune prune` (``run`` with the option groups as keywords), for
    block models and decoder LLMs (``model`` a file or an export folder, ``data`` calibration text: a path or
    an ``llm.text.TextData``). ``outcome.model`` is the pruned model, ``outcome.result`` the PruneResult
    (removals, rounds, MACs, fidelity; None for a decoder, whose facts are ``outcome.decoder``),
    ``outcome.report`` what ``--report`` writes. Fine-tunes only when ``finetune`` is given."""
    options = Options(data=data_options or DataOptions(), run=run or RunOptions(), target=target or TargetOptions(),
                      criterion=criterion or CriterionOptions(), finetune=finetune,
                      recovery=recovery or RecoveryOptions(), output=output or OutputOptions())
    return _run(model, data, options)
