"""One prune run of a decoder LLM with a KV cache: text in, decoder layers out, interface change reported.
``pipeline.run`` dispatches here by itself (``is_decoder``); ``pipeline.write`` writes the outcome
(``llm.output.write_decoder``):

    outcome = pipeline.run("llama/optimum/", "corpus.txt", Options(target=TargetOptions(remove=2)))
    pipeline.write(outcome, "llama_pruned/")

Input and output: an export folder (optimum or onnxruntime-genai: the model, its configs, tokenizer files)
-> a new folder (``llm.folder.prune_folder``: configs updated, other files copied, written atomically); or a
model file -> a model file (the configs beside the input are not rewritten: prune the folder for that).
The tokenizer is the ``tokenizer.json`` beside the model (``--tokenizer`` to give another).

Schedule: the target is ``--remove N`` layers (or ``--plan`` replaying a report's removals, or a latency
target turned into a layer count and checked by timing, ``llm.deploy``); iterative by
default (score the remaining layers, remove the least important, repeat), or one-shot: ``schedule.rounds``,
as for blocks. Criteria: the metrics of ``--metrics`` in ``--scope`` (``llm.scoring``); ShortGPT's Block
Influence is ``--metrics cosine --scope local``. Quality: perplexity on the held-back windows of the
calibration text and on ``--eval TEXT`` when given. Fine-tuning (``--finetune-epochs``): distillation from
the original model's logits on the calibration windows through the PyTorch bridge (optimum exports); the
fused onnxruntime operators of genai exports are not in the bridge, and the run says which ones. ``--quantize``
quantizes the result last (``llm.deploy``: the four rows in the report). Options a
decoder run cannot honour are refused in one line naming the flag (``check_decoder_options``, declared by
each option's ``decoder`` reason in ``options.py``).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import MISSING, replace

import numpy as np
import onnx

from .. import __version__
from ..errors import InputError, TargetError
from ..graph.decoder import FUSED, DecoderReport, cache_names, expose_residual_sums, find_decoder_layers
from ..graph.flops import count_params
from ..graph.ir import load_model_and_layout
from ..graph.kv_surgery import remove_layers
from ..graph.quant import finetune_refusal, model_bytes, quantized_ops
from ..metrics import get_metric, resolve_metrics
from ..options import DEFAULT_CRITERION, Options
from ..outcome import DecoderRun, Outcome, Source
from ..report import SCHEMA_VERSION, sha256_file
from ..runtime import SHARE_WEIGHTS_BYTES
from ..schedule import check_schedule, eligible_now, rounds
from .batching import decoder_batch
from .deploy import check_deploy_options, meet_latency, quantize_outcome, wants_latency
from .layers import allowed_layers, interface_change, plan_layers
from .perplexity import perplexity, throughput
from .scoring import original_logits, score_layers
from .folder import model_file
from .spill import spill_weights
from .staged import staged_scorer
from .text import TextData, find_tokenizer, load_text

log = logging.getLogger("onnx_consensus")
__all__ = ["DecoderOutcome", "is_decoder", "model_file", "open_decoder", "check_decoder_options", "prune_decoder",
           "distill"]
DecoderOutcome = Outcome
"""A decoder run's outcome is the common ``pipeline.Outcome`` (its ``decoder`` holds the decoder's facts)."""


def is_decoder(model: onnx.ModelProto) -> bool:
    """Whether ``model``'s interface carries a per-layer KV cache: numbered inputs paired with numbered outputs
    (``decoder.cache_names``) that are 4-D, (batch, kv_heads, length, head_dim), and named as caches (past,
    cache, key or value in the input's name). Other numbered input/output pairs (x0, x1 -> y0, y1) are not."""
    try:
        cache = cache_names(model)
    except InputError:
        return False
    if cache is None:
        return False
    inputs = {v.name: v for v in model.graph.input}
    for name in cache.past(0):
        v = inputs.get(name)
        if v is None or len(v.type.tensor_type.shape.dim) != 4:
            return False
        if not any(k in name.lower() for k in ("past", "cache", "key", "value")):
            return False
    return True


def open_decoder(path: str | os.PathLike, *, follow_symlinks: bool = False) -> Source:
    """The ``Source`` of a decoder given as an export folder or a model file (``model_file``; the sha256 is the
    model file's)."""
    source = os.path.abspath(os.fspath(path))
    file = model_file(source, follow_symlinks=follow_symlinks)
    model, external = load_model_and_layout(file)
    return Source(model, source, external, sha256_file(file), model_file=file)


def check_decoder_options(options: Options) -> None:
    """InputError in one line naming the first option set (to anything but its default) that decoder runs
    refuse: the fields whose ``option(..., decoder=reason)`` gives a reason (``options.py``); and ``--report``
    to an .html file (the HTML report draws a block model's report)."""
    for group in (options.data, options.run, options.target, options.criterion, options.finetune,
                  options.recovery, options.output):
        for f, m in (group.cli_fields() if group is not None else ()):
            default = f.default if f.default is not MISSING else f.default_factory()
            if m["decoder"] and getattr(group, f.name) != default:
                raise InputError(f"{m['flag']} is not supported for decoder LLMs with a KV cache: {m['decoder']}")
    if (options.output.report or "").endswith(".html"):  # --report is honoured, its HTML form is not
        raise InputError("--report: the HTML report is for block models; give a .json path for decoder LLMs")


def prune_decoder(model: str | os.PathLike | Source | onnx.ModelProto, text, options: Options | None = None, *,
                  progress=None) -> Outcome:
    """Prune the decoder ``model`` (an export folder or a model file, a ``Source`` or an in-memory ModelProto;
    never modified) on the calibration ``text`` (a path: .txt, .jsonl or a folder of them; or a TextData), as
    ``options`` say: the decoder part of ``pipeline.run``. Raises InputError (bad input or options),
    TargetError (the target cannot be met)."""
    t_start = time.perf_counter()
    options = options or Options()
    if options.criterion.metrics is None:
        # --metrics not given: ``output`` also when fine-tuning follows (the decoder columns of the criterion
        # benchmark favour it after distillation too, and paper+output scores ~6x longer on the tiny Llama)
        options = replace(options, criterion=replace(options.criterion, metrics=DEFAULT_CRITERION))
    check_decoder_options(options)
    owned = not isinstance(model, onnx.ModelProto)  # loaded here (or by open_model): ours to spill
    src = model if isinstance(model, Source) else Source(model) if not owned else \
        open_decoder(model, follow_symlinks=options.data.follow_symlinks)
    model = src.model
    check_deploy_options(model, options)
    tuning = options.finetune is not None and options.finetune.epochs > 0
    if tuning and quantized_ops(model):
        raise InputError(finetune_refusal(quantized_ops(model)))
    spill = None
    if owned and not tuning:  # weights mapped from a file, not copied; the loaded proto is dropped
        model, spill = spill_weights(model, SHARE_WEIGHTS_BYTES)
        src.model = model
    original_report = find_decoder_layers(model)
    work = expose_residual_sums(model) if original_report.form == FUSED else model
    report = find_decoder_layers(work) if work is not model else original_report
    data = _calibration_text(text, src, options)
    score_windows, hold_windows = data.split_windows(options.run.holdout, options.criterion.seed)
    latency_target = None
    if wants_latency(options):  # the layer count from the measured per-layer time, checked on the pruned model
        removed, scored, stop, latency_target = meet_latency(model, report, data.windows[0], options, lambda o:
                                                             _choose_layers(work, report, score_windows, o, progress))
    else:
        removed, scored, stop = _choose_layers(work, report, score_windows, options, progress)
    pruned = remove_layers(model, removed, report=original_report) if removed else model
    quality, speed = _quality(model, pruned, data, hold_windows, options)
    outcome = Outcome(pruned, None, {}, options, external=src.external, status="done" if removed else
                      "nothing removed", write=bool(removed) or options.output.force_write
                      or bool(options.output.quantize),
                      decoder=DecoderRun(removed, src.path, src.folder, original_report, spill))
    if tuning and removed:
        outcome.finetune = _finetune(outcome, model, score_windows,  # a failure: its "error", exit 4
                                     hold_windows if len(hold_windows) else score_windows, options, quality)
    ids = {layer.index: layer.block.id for layer in report.layers}
    outcome.report = _report(src, model, outcome, data, original_report, ids, scored, stop,
                             {"perplexity": quality, "throughput": speed, "score": len(score_windows),
                              "holdout": len(hold_windows)})
    outcome.report["latency_target"] = latency_target
    if options.output.quantize:  # the written model becomes the pruned (fine-tuned) model quantized
        outcome.report["quantize"] = quantize_outcome(model, outcome, hold_windows, data.windows[0], options)
    outcome.report["seconds"] = round(time.perf_counter() - t_start, 2)
    return outcome


def _calibration_text(text, src: Source, options: Options) -> TextData:
    """The calibration windows: ``text`` itself (a TextData), or read from its path with the tokenizer beside
    the model (or ``--tokenizer``)."""
    if isinstance(text, TextData):
        return text
    if text is None:
        raise InputError("decoder LLMs need calibration text: --calib corpus.txt (or a folder of .txt/.jsonl)")
    if src.path is None and options.data.tokenizer is None:
        raise InputError("a decoder given in memory needs its tokenizer: --tokenizer FILE (options.data.tokenizer) "
                         "or calibration text as a TextData")
    tok = find_tokenizer(src.path, options.data.tokenizer, follow_symlinks=options.data.follow_symlinks)
    return load_text(text, tok, seq_len=options.data.seq_len, max_samples=options.data.max_samples,
                     follow_symlinks=options.data.follow_symlinks)


def _layer_targets(report: DecoderReport, options: Options) -> tuple[list[int] | None, set[int]]:
    """(the ``--plan``'s layer numbers or None, the layers ``--only``/``--exclude`` allow); InputError /
    TargetError when ``--remove`` is missing, negative or more than the allowed layers and
    ``--keep-per-stage`` leave."""
    target = options.target
    n = len(report.layers)
    plan = plan_layers(target.plan, report) if target.plan else None
    allowed, limit = allowed_layers(report, target)
    if plan is None:
        if target.remove is None:
            raise InputError("decoder LLMs: give the number of layers to remove with --remove N (or --plan)")
        if target.remove < 0:
            raise InputError("--remove must be >= 0")
        if target.remove > limit:
            raise TargetError(f"cannot remove {target.remove} of {n} decoder layers: at most {limit} "
                              f"(--keep-per-stage {target.keep_per_stage}, --only/--exclude)")
    return plan, allowed


def _choose_layers(work: onnx.ModelProto, report: DecoderReport, windows: np.ndarray, options: Options,
                   progress=None) -> tuple[list[int], list, str]:
    """(the layer numbers to remove in order, the scoring rounds, the stop reason): the plan replayed, or
    ``schedule.rounds`` driven until ``--remove`` layers are chosen, each round scored by ``score_layers``
    on ``windows`` (n, seq) int64."""
    crit, target, run = options.criterion, options.target, options.run
    plan, allowed = _layer_targets(report, options)
    if plan is not None:
        return list(plan), [], "plan replayed"
    check_schedule(crit.schedule, crit.rescore_top)
    kw = dict(metrics=crit.metrics, scope=crit.scope, seed=crit.seed, pca_dim=crit.pca_dim,
              batch_size=decoder_batch(windows.shape[1], run.batch_size), threads=run.threads, weights=crit.weights)
    staged = staged_scorer(work, report, windows, crit, kw)  # None: every candidate, every round
    if not staged and crit.scope == "global" and any(get_metric(m).output for m in resolve_metrics(crit.metrics, True)):
        # every round is anchored to the ORIGINAL model's logits (a bounded (rows, vocab) array)
        kw["reference"] = original_logits(work, windows, seed=crit.seed, batch_size=kw["batch_size"],
                                          threads=run.threads)
    ids = {layer.index: layer.block.id for layer in report.layers}
    stages = {i: 0 for i in ids.values()}  # one stack: --keep-per-stage K keeps K layers (checked above too)
    allowed_id = {ids[i] for i in allowed}
    removed: list[int] = []
    scored = []

    def score(candidates: list[int]):
        scored.append(staged.round(removed, candidates) if staged else
                      score_layers(work, report, windows, removed=removed, candidates=candidates, **kw))
        return scored[-1]

    def eligible() -> dict[str, int]:
        left = {ids[i]: i for i in sorted(ids) if i not in removed}
        return eligible_now(left, stages, {ids[i] for i in removed}, allowed_id, target.keep_per_stage)

    try:
        for rnd in rounds(eligible, score, schedule=crit.schedule, rescore_top=crit.rescore_top) if target.remove \
                else ():
            removed.append(rnd.eligible[rnd.first()])
            log.info("round %d: removed layer %d (%s)", rnd.number + 1, removed[-1], ids[removed[-1]])
            if progress:
                progress(f"round {rnd.number + 1}: removed decoder layer {removed[-1]}")
            if len(removed) >= target.remove:
                break
    finally:
        if staged:
            staged.close()
    return removed, scored, f"removed {target.remove} layer(s)" if removed else "nothing to remove (--remove 0)"


def _quality(model: onnx.ModelProto, pruned: onnx.ModelProto, data: TextData, hold_windows: np.ndarray,
             options: Options) -> tuple[dict, dict | None]:
    """(perplexity before/after on the held-back windows and on ``--eval`` text, tokens/s before/after or None
    with ``--no-latency`` or nothing removed)."""
    run = options.run
    quality = {}
    if len(hold_windows):
        quality["holdout"] = {"windows": int(len(hold_windows)),
                              "before": perplexity(model, hold_windows, threads=run.threads),
                              "after": perplexity(pruned, hold_windows, threads=run.threads)}
    if options.recovery.eval:
        eval_data = load_text(options.recovery.eval, data.tokenizer, seq_len=data.seq_len,
                              follow_symlinks=options.data.follow_symlinks)
        quality["eval"] = {"text": eval_data.source, "windows": eval_data.n_samples,
                           "before": perplexity(model, eval_data.windows, threads=run.threads),
                           "after": perplexity(pruned, eval_data.windows, threads=run.threads)}
    speed = None
    if pruned is not model and options.output.latency:
        steps = max(4, options.output.latency_runs)
        speed = {"before": throughput(model, data.windows[0], steps=steps, threads=run.threads or 1),
                 "after": throughput(pruned, data.windows[0], steps=steps, threads=run.threads or 1)}
    return quality, speed


def _report(src: Source, model: onnx.ModelProto, outcome: Outcome, data: TextData, layers: DecoderReport,
            ids: dict[int, str], scored: list, stop: str, measured: dict) -> dict:
    """The decoder run's JSON report: the common keys of every report (docs/REPORT_SCHEMA.md) and the
    decoder's own (form, calib, interface, perplexity, throughput, ...). ``measured``: {"perplexity",
    "throughput", "score" / "holdout" (window counts)}."""
    removed, options = outcome.decoder.removed, outcome.options
    params_before, params_after = count_params(model), count_params(outcome.model)
    return {
        "schema_version": SCHEMA_VERSION, "tool": "onnx-consensus", "version": __version__, "kind": "decoder",
        "input": src.path, "model_file": src.model_file, "input_sha256": src.sha256, "form": layers.form,
        "notes": layers.notes,
        "calib": {"text": data.source, "tokenizer": data.tokenizer, "tokens": data.n_tokens,
                  "seq_len": data.seq_len, "windows_scoring": int(measured["score"]),
                  "windows_holdout": int(measured["holdout"])},
        "candidates": [layer.to_json() for layer in layers.layers],
        "removed": [{"index": i, "id": ids[i], "round": k + 1} for k, i in enumerate(removed)],
        "removed_ids": [ids[i] for i in removed],
        "stop_reason": stop,
        "interface": interface_change(model, layers, removed),
        "perplexity": measured["perplexity"],
        "params": {"before": params_before, "after": params_after,
                   "ratio": params_after / params_before if params_before else None},
        "weight_bytes": {"before": model_bytes(model), "after": model_bytes(outcome.model)},
        "throughput": measured["throughput"],
        "rounds": [r.to_json() for r in scored],
        "finetune": outcome.finetune,
        "options": options.to_flags(),
        "seed": options.criterion.seed,
        "seconds": None,
        "output": None,
    }


def _finetune(outcome: DecoderOutcome, original: onnx.ModelProto, train_windows: np.ndarray,
              eval_windows: np.ndarray, options: Options, quality: dict) -> dict:
    """``distill`` the outcome's model in place; on failure the pruned model stays (exit 4; 130 interrupted
    with --keep-partial): ``finetune.job.guarded``."""
    from ..finetune.decoder import distill as distill_decoder
    from ..finetune.job import guarded
    from ..finetune.results import DistillReport

    def run():
        return distill_decoder(original, outcome.model, train_windows, eval_windows, options.finetune,
                               threads=options.run.threads, progress=options.run.progress)
    done, error, code = guarded(run, keep_partial=options.output.keep_partial)
    if error is not None:
        outcome.exit_code, outcome.status = code, "finetune interrupted" if code == 130 else "finetune failed"
        outcome.warnings.append(error)
        return DistillReport(epochs=options.finetune.epochs, error=error).to_json()
    (outcome.model, info), outcome.finetuned = done, True
    quality["finetuned"] = {"windows": int(len(eval_windows)), "after": info.perplexity_after}
    return info.to_json()


def distill(original: onnx.ModelProto, pruned: onnx.ModelProto, train_windows: np.ndarray,
            eval_windows: np.ndarray, config, *, threads: int | None = None,
            progress: bool = False) -> tuple[onnx.ModelProto, dict]:
    """``finetune.decoder.distill``: distil ``pruned`` from ``original`` on ``train_windows`` (n, seq) int64, the
    best of {pruned, each epoch} by perplexity on ``eval_windows`` kept. Returns (model, the report entry)."""
    from ..finetune.decoder import distill as distill_decoder

    model, info = distill_decoder(original, pruned, train_windows, eval_windows, config, threads=threads,
                                  progress=progress)
    return model, info.to_json()
