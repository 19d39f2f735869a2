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

from .batching import calibration_shapes
from .bench import LatencyChange, measure_latency, random_feed
from .data.for_model import calibration_for, extra_data_for
from .errors import InputError, PruneFailed
from .graph.blocks import find_blocks
from .graph.flops import count_cost
from .kinds.outputs import choose_feature, output_kinds
from .graph.ir import interface, load_model, load_model_and_layout
from .graph.precision import float32_shadow, is_bfloat16
from .graph.quant import finetune_refusal, quantized_ops
from .graph.surgery import remove_blocks
from .graph.weights import all_tensors
from .io import check_output_path, save_model_atomic, write_json_atomic
from .memory import fit_memory
from .metrics.presets import check_names
from .options import (CriterionOptions, DataOptions, FinetuneConfig, Options, OutputOptions,
                      RecoveryOptions, RunOptions, TargetOptions, default_criterion)
from .pruner import PruneResult
from .pruner import prune as schedule
from .report import build_report, sha256_file, stamp
from .runtime import resolve_providers, using_providers

log = logging.getLogger("onnx_consensus")
__all__ = ["Source", "Outcome", "Written", "open_model", "check_output", "run", "write", "write_report", "prune",
           "inspect"]


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
        when a fine-tuned epoch beat the pruned model on the eval data or the hold-out); ``write`` says
        whether it is written at all.
    result: the schedule's PruneResult (its ``model`` is ``model``); the partial one after a failure.
    report: the JSON report (``report.build_report``) with ``seconds`` (and ``partial``/``error``).
    latency: {batch size: before/after ms} or None; finetune: the fine-tuning info or None.
    exit_code / status: 0 "done", "nothing removed" or "saves too little" (with no target, removals under
        ``pruner.MIN_MACS_SAVING`` of the MACs: not written); 4 "finetune failed"; 130 "finetune interrupted";
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
        for t in all_tensors(source.model):
            for entry in t.external_data:
                if entry.key == "location" and os.path.exists(entry.value) and os.path.samefile(entry.value, data_out):
                    raise InputError(f"the output's weights would go to {data_out}, which holds the input's "
                                     "weights; choose another output name")
    return path


def _warn(warnings: list[str], message: str) -> None:
    log.warning("%s", message)
    warnings.append(message)


def run(model: onnx.ModelProto | Source | str | os.PathLike, data, options: Options | None = None) -> Outcome:
    """Prune ``model`` (a ModelProto, a Source or a path; never modified) scored on ``data`` (a
    CalibrationData, or a path loaded with ``options.data``), as ``options`` say. Raises InputError /
    TargetError / the failure of a run that failed midway (KeyboardInterrupt, an onnxruntime error),
    unless ``options.output.keep_partial``: then the Outcome has status "partial". Every onnxruntime
    session of the run uses ``options.run.providers``."""
    options = options or Options()
    with using_providers(resolve_providers(options.run.providers)):
        return _run_on_providers(model, data, options)


def _run_on_providers(model, data, options: Options) -> Outcome:
    t_start = time.perf_counter()
    source = model if isinstance(model, Source) else (
        open_model(model) if isinstance(model, (str, os.PathLike)) else Source(model))
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
    criterion = {"metrics": list(options.criterion.metrics), "default": default_for}
    if options.run.batch_size < 1:
        raise InputError("--batch-size must be >= 1")
    warnings: list[str] = []
    original = model = source.model
    from .llm.run import is_decoder

    if is_decoder(original):
        raise InputError("a decoder LLM with a KV cache: prune it with onnx_consensus.llm.prune_decoder on "
                         "calibration text (the command line does this by itself)")
    bfloat16 = is_bfloat16(original)
    if bfloat16:
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
    nothing = _no_removable_block(source, model, options)
    if nothing is not None and not options.output.quantize:  # said before any data is read or inference runs
        return nothing
    data = calibration_for(data, original, options.data)
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
    hook = None
    if between:
        from .finetune.between import between_removals

        train = extra_data_for(options.recovery.train, model, options.data) or data
        hook = between_removals(model, train, config=replace(ft or FinetuneConfig(), epochs=1), steps=between)
    report_options = {"input": source.path, "calib": data.source, **options.to_flags()}
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

    def report_of(result, **kw) -> dict:
        return build_report(result, options=report_options, input_path=source.path, input_sha256=source.sha256,
                            criterion=criterion, **kw)

    def on_original(result: PruneResult) -> onnx.ModelProto:
        """The pruned model to write: for a bfloat16 input, the removals applied to the bfloat16 original."""
        if not bfloat16:
            return result.model
        return remove_blocks(original, [r.block for r in result.removals]) if result.removals else original

    check_feed = None if bfloat16 else next(data.batches(1))
    failure = None
    scoring = options.criterion
    if scoring.feature and finetuning and ft.feature_mse > 0 and _output_only(scoring.metrics):
        scoring = replace(scoring, feature=None)  # --feature is the fine-tuning's feature MSE tensor, not scored
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
        latency = _latency(model, result.model, next(data.batches(options.run.batch_size)), options,
                           fixed=fixed, axes=data.batch_axes)
    finetune_info, exit_code, status = None, 0, "done" if result.removals else "nothing removed"
    if finetuning and result.removals:
        finetune_info, exit_code = _finetune(model, result, data, options, warnings)
        if exit_code:
            status = "finetune interrupted" if exit_code == 130 else "finetune failed"
    report = report_of(result, latency=latency, finetune=finetune_info)
    report["latency_target"] = latency_target
    if (options.output.report or "").endswith(".html") and result.removals:  # the HTML report's removal curve
        from .trajectory import run_curve

        report["curve"] = run_curve(model, result, data, options, fixed=fixed)
    if options.output.quantize:  # the written model becomes the pruned (fine-tuned) model quantized
        from .variants import quantize_run

        result.model, report["quantize"] = quantize_run(model, result, data, options, fixed=fixed,
                                                        eval_data=extra_data_for(options.recovery.eval, model,
                                                                              options.data))
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    keep = bool(result.removals) and not _too_small(result, options, warnings)
    if result.removals and not keep:
        status = "saves too little"
    report.update(small_saving=result.small_saving, memory=memory)
    return Outcome(result.model, result, report, options, latency=latency, finetune=finetune_info,
                   exit_code=exit_code, status=status,
                   write=keep or options.output.force_write or bool(options.output.quantize),
                   check_feed=check_feed, external=source.external, warnings=warnings)


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
    from .pruner import PruneResult

    cost = count_cost(model, options.run.input_shapes or None)
    found = find_blocks(model, macs_per_node=cost.macs_per_node, unit=options.criterion.unit)
    if found.blocks:
        return None
    if found.refusal:
        why = found.refusal
    elif found.not_removable:
        reasons = sorted({n.reason for n in found.not_removable})
        why = (f"{len(found.not_removable)} residual merge(s) seen, none removable: " + "; ".join(reasons[:3])
               + ("; ..." if len(reasons) > 3 else ""))
    else:
        why = "no residual merge in the graph"
    result = PruneResult(model=source.model, original_blocks=found, macs_before=cost.total_macs,
                         macs_after=cost.total_macs, params_before=cost.params, params_after=cost.params,
                         weight_bytes_before=cost.weight_bytes, weight_bytes_after=cost.weight_bytes,
                         stop_reason=f"no removable block: {why}")
    log.info("no removable block: %s", why)
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
        written.report = write_report(report, outcome.options.output.report)
    return written


def write_report(report: dict, path: str) -> str:
    """Write the JSON report to ``path`` (atomic: ``io.write_json_atomic``); for ``.html``, the HTML report
    there and the JSON beside it (``.json``). Returns the path."""
    if path.endswith(".html"):
        import json

        from .report_html import write_html

        write_report(report, path[: -len(".html")] + ".json")
        return write_html(json.loads(json.dumps(report, default=_jsonable)), path)
    return write_json_atomic(path, report, default=_jsonable)


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
            input_shapes: dict[str, tuple[int, ...]] | None = None, task: str | None = None,
            output_kind: tuple[str, ...] = ()) -> dict:
    """The removable blocks of a model file, without running it: {model, macs, params, unit, blocks (each
    with ``macs_share``), not_removable, notes, feature (the global scope's feature tensors and why, or
    None with the reason in ``notes``), outputs (each float output's kind), finetune_refuses (why fine-tuning
    will be refused, e.g. a quantized graph, else None; also the first note)}."""
    from .llm.inspect import inspect_decoder
    from .llm.run import is_decoder, model_file

    path = model_file(path)  # an export folder: its model file
    model = load_model(path)
    if is_decoder(model):
        return inspect_decoder(path, model)
    cost = count_cost(model, input_shapes or {})
    report = find_blocks(model, macs_per_node=cost.macs_per_node, unit=unit)
    total = cost.total_macs
    blocks = []
    for b in report.blocks:
        d = b.to_json()
        d["macs_share"] = (b.macs / total) if (b.macs is not None and total) else None
        blocks.append(d)
    notes = list(cost.notes) + list(report.notes)
    refused, quantized = None, quantized_ops(model)
    if quantized:  # prune works on it; say here what fine-tuning will do, with the same line
        refused = finetune_refusal(quantized)
        notes.insert(0, f"prune removes blocks from this model; {refused}")
    try:
        feature = choose_feature(model, report.blocks, task=task).to_json()
    except InputError as exc:
        feature = None
        notes.append(f"no feature tensor: {exc}")
    return {"model": os.fspath(path), "macs": total, "params": cost.params, "weight_bytes": cost.weight_bytes,
            "unit": unit, "blocks": blocks,
            "not_removable": [n.to_json() for n in report.not_removable], "notes": notes, "feature": feature,
            "outputs": output_kinds(model, task, output_kind), "finetune_refuses": refused}

