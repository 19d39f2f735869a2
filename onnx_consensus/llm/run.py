"""One prune run of a decoder LLM with a KV cache: text in, decoder layers out, interface change reported.

    outcome = prune_decoder("llama/optimum/", "corpus.txt", Options(target=TargetOptions(remove=2)))
    write_decoder(outcome, "llama_pruned/")

Input and output: an export folder (optimum or onnxruntime-genai: the model, its configs, tokenizer files)
-> a new folder (``kv_surgery.prune_folder``: configs updated, other files copied, written atomically); or a
model file -> a model file (the configs beside the input are not rewritten: prune the folder for that).
The tokenizer is the ``tokenizer.json`` beside the model (``--tokenizer`` to give another).

Schedule: the target is ``--remove N`` layers (or ``--plan`` replaying a report's removals); iterative by
default (score the remaining layers, remove the least important, repeat), or one-shot. Criteria: the
metrics of ``--metrics`` in ``--scope`` (``llm.scoring``); ShortGPT's Block Influence is
``--metrics cosine --scope local``. Quality: perplexity on the held-back windows of the calibration text
and on ``--eval TEXT`` when given. Fine-tuning (``--finetune-epochs``): distillation from the original
model's logits on the calibration windows through the PyTorch bridge (optimum exports); the fused
onnxruntime operators of genai exports are not in the bridge, and the run says which ones.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from ..errors import FinetuneError, InputError, TargetError
from ..graph.decoder import (FUSED, DecoderReport, cache_names, dummy_feed, expose_residual_sums,
                             find_decoder_layers, prefill_feed)
from ..graph.flops import count_params
from ..graph.ir import load_model_and_layout
from ..graph.quant import finetune_refusal, model_bytes, quantized_ops
from ..graph.kv_surgery import prune_folder, remove_layers
from ..graph.weights import release_mapped_pages
from ..metrics import get_metric, resolve_metrics
from ..options import DEFAULT_CRITERION, Options
from ..paths import confined_file
from ..report import METADATA_KEY, sha256_file
from ..runtime import SHARE_WEIGHTS_BYTES
from .perplexity import perplexity, throughput
from .scoring import original_logits, score_layers
from .spill import Spill, inline_weights, spill_weights
from .staged import staged_scorer
from .text import TextData, find_tokenizer, load_text

log = logging.getLogger("onnx_consensus")
__all__ = ["DecoderOutcome", "is_decoder", "prune_decoder", "write_decoder", "summary", "distill"]


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


def model_file(path: str | os.PathLike, *, follow_symlinks: bool = False) -> str:
    """The ONNX file of an export folder (genai_config's decoder filename, else model.onnx: a regular file inside
    the folder, ``paths.confined_file``), or ``path``."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise InputError(f"model not found: {path}")
        return path
    from ..graph.kv_surgery import decoder_filename

    name = decoder_filename(path, follow_symlinks=follow_symlinks)
    if not os.path.lexists(os.path.join(path, name)):
        raise InputError(f"no {name} in the folder {path}")
    confined_file(path, name, what="the decoder model of the export folder", follow_symlinks=follow_symlinks,
                  hint="pass --follow-symlinks to read it")
    return os.path.normpath(os.path.join(path, name))  # its external data is beside it, as onnx looks for it


@dataclass
class DecoderOutcome:
    """What a decoder run produced. model: the pruned model (fine-tuned when that succeeded); removed: the
    original layer numbers in removal order; source: the input path (a folder or a file); report: the JSON
    report; exit_code / status as ``pipeline.Outcome``'s."""

    model: onnx.ModelProto
    removed: list[int]
    report: dict
    options: Options
    source: str
    folder: bool
    external: bool
    layers: DecoderReport
    exit_code: int = 0
    status: str = "done"
    finetuned: bool = False
    warnings: list[str] = field(default_factory=list)
    spill: Spill | None = None  # the temporary file of an inline input's weights (``llm.spill``)

    @property
    def write(self) -> bool:
        return bool(self.removed) or self.options.output.force_write


def _layer_numbers(values, report: DecoderReport) -> set[int]:
    """--only/--exclude/--plan entries (layer ids, i.e. exit tensor names, or layer numbers) -> numbers."""
    by_id = report.by_id()
    out = set()
    for v in values:
        if v in by_id:
            out.add(by_id[v].index)
        elif str(v).isdigit() and int(v) in report.by_index():
            out.add(int(v))
        else:
            raise InputError(f"{v!r} is not a decoder layer of this model (ids: {', '.join(by_id)}; or numbers "
                             f"0..{len(by_id) - 1})")
    return out


def interface_change(model: onnx.ModelProto, report: DecoderReport, removed) -> dict:
    """{"removed_inputs", "removed_outputs", "renamed" {old: new}}: the caches of removed layers go, the others
    are renumbered 0..k-1 in stack order."""
    cache = report.cache
    chosen = set(removed)
    kept = [i for i in range(cache.n_layers) if i not in chosen]
    renamed = {}
    for new, old in enumerate(kept):
        for a, b in zip(cache.past(old) + cache.present(old), cache.past(new) + cache.present(new)):
            if a != b:
                renamed[a] = b
    gone = [i for i in range(cache.n_layers)][len(kept):]
    return {"removed_layer_caches": [t for i in sorted(chosen) for t in cache.past(i) + cache.present(i)],
            "removed_inputs": [p for i in gone for p in cache.past(i)],
            "removed_outputs": [q for i in gone for q in cache.present(i)],
            "renamed": renamed, "layers_before": cache.n_layers, "layers_after": len(kept)}


def prune_decoder(model_path: str | os.PathLike, text, options: Options | None = None, *,
                  progress=None) -> DecoderOutcome:
    """Prune the decoder at ``model_path`` (an export folder or a model file; never modified) on the
    calibration ``text`` (a path: .txt, .jsonl or a folder of them; or a TextData), as ``options`` say.
    Raises InputError (bad input or options), TargetError (the target cannot be met)."""
    t_start = time.perf_counter()
    options = options or Options()
    if options.criterion.metrics is None:
        # --metrics not given: ``output`` also when fine-tuning follows (the decoder columns of the criterion
        # benchmark favour it after distillation too, and paper+output scores ~6x longer on the tiny Llama)
        options = replace(options, criterion=replace(options.criterion, metrics=DEFAULT_CRITERION))
    crit, target, run = options.criterion, options.target, options.run
    source = os.path.abspath(os.fspath(model_path))
    path = model_file(source, follow_symlinks=options.data.follow_symlinks)
    folder = os.path.isdir(source)
    model, external = load_model_and_layout(path)
    tuning = options.finetune is not None and options.finetune.epochs > 0
    if tuning and quantized_ops(model):
        raise InputError(finetune_refusal(quantized_ops(model)))
    spill = None if tuning else spill_weights(model, SHARE_WEIGHTS_BYTES)  # inline weights: mapped, not copied
    original_report = find_decoder_layers(model)
    work = expose_residual_sums(model) if original_report.form == FUSED else model
    report = find_decoder_layers(work) if work is not model else original_report
    n = len(report.layers)
    if isinstance(text, TextData):
        data = text
    else:
        if text is None:
            raise InputError("decoder LLMs need calibration text: --calib corpus.txt (or a folder of .txt/.jsonl)")
        tok = find_tokenizer(source, options.data.tokenizer, follow_symlinks=options.data.follow_symlinks)
        data = load_text(text, tok, seq_len=options.data.seq_len, max_samples=options.data.max_samples,
                         follow_symlinks=options.data.follow_symlinks)
    score_windows, hold_windows = data.split(run.holdout, crit.seed)
    warnings: list[str] = []
    if target.target_flops is not None:
        raise InputError("decoder LLMs: the target is a number of layers (--remove N) or --plan, not --target-flops")
    plan = None
    if target.plan:
        by_id = report.by_id()
        plan = [by_id[v].index if v in by_id else _single(v, report) for v in target.plan]
    allowed = set(range(n))
    if target.only:
        allowed &= _layer_numbers(target.only, report)
    allowed -= _layer_numbers(target.exclude, report)
    if plan is None:
        if target.remove is None:
            raise InputError("decoder LLMs: give the number of layers to remove with --remove N (or --plan)")
        if target.remove < 0:
            raise InputError("--remove must be >= 0")
        limit = min(len(allowed), n - max(target.keep_per_stage, 1))
        if target.remove > limit:
            raise TargetError(f"cannot remove {target.remove} of {n} decoder layers: at most {limit} "
                              f"(--keep-per-stage {target.keep_per_stage}, --only/--exclude)")
    rounds = []
    removed: list[int] = []
    ids = {layer.index: layer.block.id for layer in report.layers}
    if plan is not None:
        removed = list(plan)
        stop = "plan replayed"
    else:
        kw = dict(metrics=crit.metrics, scope=crit.scope, seed=crit.seed, pca_dim=crit.pca_dim,
                  batch_size=min(run.batch_size, 16), threads=run.threads, weights=crit.weights)
        staged = staged_scorer(work, report, score_windows, crit, kw)  # None: every candidate, every round
        if not staged and crit.scope == "global" and any(get_metric(m).output for m in resolve_metrics(crit.metrics)):
            # every round is anchored to the ORIGINAL model's logits (a bounded (rows, vocab) array)
            kw["reference"] = original_logits(work, score_windows, seed=crit.seed, batch_size=kw["batch_size"],
                                              threads=run.threads)
        order: list[int] = []
        if crit.rescore_top is not None and crit.rescore_top < 1:
            raise InputError("--rescore-top must be >= 1")
        while len(removed) < target.remove:
            cands = sorted(allowed - set(removed))
            if crit.rescore_top is not None and order:  # as the CNN pruner: the K best of the previous order
                cands = [i for i in order if i in cands][:crit.rescore_top] or cands
            r = (staged.round(removed, cands) if staged else
                 score_layers(work, report, score_windows, removed=removed, candidates=cands, **kw))
            rounds.append(r)
            rescored = [report.by_id()[b].index for b in r.order]
            order = rescored + [i for i in order if i not in rescored and i not in removed]
            if crit.schedule == "one-shot":
                removed = order[:target.remove]
                break
            removed.append(order[0])
            log.info("round %d: removed layer %d (%s)", len(rounds), order[0], ids[order[0]])
            if progress:
                progress(f"round {len(rounds)}: removed decoder layer {order[0]}")
        stop = f"removed {target.remove} layer(s)" if removed else "nothing to remove (--remove 0)"
    pruned = remove_layers(model, removed, report=original_report) if removed else model
    change = interface_change(model, original_report, removed)
    quality = {}
    if len(hold_windows):
        quality["holdout"] = {"windows": int(len(hold_windows)),
                              "before": perplexity(model, hold_windows, threads=run.threads),
                              "after": perplexity(pruned, hold_windows, threads=run.threads)}
    eval_data = None
    if options.recovery.eval:
        eval_data = load_text(options.recovery.eval, data.tokenizer, seq_len=data.seq_len,
                              follow_symlinks=options.data.follow_symlinks)
        quality["eval"] = {"text": eval_data.source, "windows": eval_data.n_samples,
                           "before": perplexity(model, eval_data.windows, threads=run.threads),
                           "after": perplexity(pruned, eval_data.windows, threads=run.threads)}
    speed = None
    if removed and options.output.latency:
        steps = max(4, options.output.latency_runs)
        speed = {"before": throughput(model, data.windows[0], steps=steps, threads=run.threads or 1),
                 "after": throughput(pruned, data.windows[0], steps=steps, threads=run.threads or 1)}
    outcome = DecoderOutcome(pruned, removed, {}, options, source, folder, external, original_report,
                             warnings=warnings, spill=spill)
    ft_info = None
    if options.finetune is not None and options.finetune.epochs > 0 and removed:
        ft_info = _finetune(outcome, model, score_windows, hold_windows if len(hold_windows) else score_windows,
                            options, quality)
    params_before, params_after = count_params(model), count_params(outcome.model)
    outcome.report = {
        "tool": "onnx-consensus", "kind": "decoder", "input": source, "model_file": path,
        "input_sha256": sha256_file(path), "form": original_report.form,
        "notes": original_report.notes,
        "calib": {"text": data.source, "tokenizer": data.tokenizer, "tokens": data.n_tokens,
                  "seq_len": data.seq_len, "windows_scoring": int(len(score_windows)),
                  "windows_holdout": int(len(hold_windows))},
        "candidates": [layer.to_json() for layer in original_report.layers],
        "removed": [{"index": i, "id": ids[i], "round": k + 1} for k, i in enumerate(removed)],
        "removed_ids": [ids[i] for i in removed],
        "stop_reason": stop,
        "interface": change,
        "perplexity": quality,
        "params": {"before": params_before, "after": params_after,
                   "ratio": params_after / params_before if params_before else None},
        "weight_bytes": {"before": model_bytes(model), "after": model_bytes(outcome.model)},
        "throughput": speed,
        "rounds": [r.to_json() for r in rounds],
        "finetune": ft_info,
        "options": options.to_flags(),
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    return outcome


def _single(v, report: DecoderReport) -> int:
    (i,) = _layer_numbers([v], report)
    return i


def _finetune(outcome: DecoderOutcome, original: onnx.ModelProto, train_windows: np.ndarray,
              eval_windows: np.ndarray, options: Options, quality: dict) -> dict:
    """``distill`` the outcome's model in place; on failure the pruned model stays (exit 4)."""
    try:
        tuned, info = distill(original, outcome.model, train_windows, eval_windows, options.finetune,
                              threads=options.run.threads, progress=options.run.progress)
    except FinetuneError as exc:
        outcome.exit_code, outcome.status = exc.exit_code, "finetune failed"
        outcome.warnings.append(str(exc))
        return {"mode": "distillation", "epochs": options.finetune.epochs, "error": str(exc)}
    outcome.model, outcome.finetuned = tuned, True
    quality["finetuned"] = {"windows": int(len(eval_windows)), "after": info["perplexity_after"]}
    return info


def distill(original: onnx.ModelProto, pruned: onnx.ModelProto, train_windows: np.ndarray,
            eval_windows: np.ndarray, config, *, threads: int | None = None,
            progress: bool = False) -> tuple[onnx.ModelProto, dict]:
    """Distil ``pruned`` from ``original`` (KL divergence of the softened next-token distributions, every
    position of every window, ``bridge.finetune``) on ``train_windows`` (n, seq) int64 through the PyTorch
    bridge; the epoch with the lowest perplexity on ``eval_windows`` is kept (the model as given when no epoch
    lowers it). Default optimiser for LLMs:
    AdamW, lr 1e-4 (``--optimizer``/``--lr`` override). Returns (model, info). Raises FinetuneError (one
    line), naming the fused onnxruntime operators the bridge cannot train (genai exports)."""
    from dataclasses import replace

    from ..bridge import check_supported
    from ..errors import UnsupportedOperatorError
    from ..recover import require_torch

    require_torch()
    try:
        check_supported(pruned)
    except UnsupportedOperatorError as exc:
        fused = any(n.domain == "com.microsoft" for n in pruned.graph.node)
        raise UnsupportedOperatorError(
            f"cannot fine-tune this export: {exc}" + (
                "; these fused onnxruntime operators are not trainable through the bridge: fine-tune the "
                "optimum export of the model (decomposed attention) instead" if fused else "")) from None
    from ..bridge.finetune import finetune

    bs = config.batch_size
    rng = np.random.default_rng(config.seed)

    class _Epoch:
        def __len__(self):
            return (len(train_windows) + bs - 1) // bs

        def __iter__(self):
            order = rng.permutation(len(train_windows))
            for s in range(0, len(order), bs):
                yield prefill_feed(original, train_windows[np.sort(order[s:s + bs])]), None

    def eval_fn(m):
        return -perplexity(m, eval_windows, threads=threads)

    cfg = config
    if config.lr is None and config.optimizer == "sgd":  # the image recipe's SGD default does not suit LLMs
        cfg = replace(config, optimizer="adamw", lr=1e-4)
    elif config.lr is None:
        cfg = replace(config, lr=1e-4)
    before = -eval_fn(pruned)
    tuned, res = finetune(pruned, lambda: _Epoch(), teacher=original, config=cfg, eval_fn=eval_fn,
                          progress=progress, distill_outputs=[original.graph.output[0].name])  # logits, not KV
    after = -eval_fn(tuned)
    kept = "fine-tuned"
    if after > before:  # no epoch helped: the pruned model as it was
        tuned, after, kept = pruned, before, "not fine-tuned: no epoch lowered the held-out perplexity"
    return tuned, {"kept": kept, "mode": "distillation", "epochs": cfg.epochs, "train_windows": int(len(train_windows)),
                   "optimizer": cfg.optimizer, "lr": cfg.lr, "max_steps": cfg.max_steps,
                   "perplexity_before": before, "perplexity_after": after, "best_epoch": res.best_epoch,
                   "seconds": round(res.seconds, 2), "history": res.history}


def _stamp(model: onnx.ModelProto, report: dict) -> None:
    keep = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    prov = {k: report.get(k) for k in ("tool", "input", "options", "removed_ids", "interface", "params")}
    prov["input_sha256"] = report.get("input_sha256")
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(prov, sort_keys=True))


def _unknown_to_onnx(model: onnx.ModelProto) -> list[str]:
    """Operators in the default domain that onnx does not define (onnxruntime's, as genai exports use)."""
    return sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")
                   and not onnx.defs.has(n.op_type)})


def write_decoder(outcome: DecoderOutcome, out_path: str | os.PathLike) -> str | None:
    """Write the pruned decoder: a folder when the input was a folder (configs updated, other files copied),
    else a model file (external data ``<name>.data`` when the input had it). Checked by one onnxruntime run
    (prefill) and by ``onnx.checker`` unless the graph has operators onnx does not define (said in the
    report's ``checks``). Returns the path written, or None when there is nothing to write."""
    from ..io import check_output_path, save_model_atomic

    out_path = os.path.abspath(os.fspath(out_path))
    if not outcome.write:
        return None
    _stamp(outcome.model, outcome.report)
    if outcome.spill is not None:  # the input's weights were inline: so are the output's
        inline_weights(outcome.model, outcome.spill)
        release_mapped_pages()
    unknown = _unknown_to_onnx(outcome.model)
    checks = ["onnxruntime prefill run"]
    if outcome.folder:
        prune_folder(outcome.source, out_path, outcome.removed, pruned=outcome.model, report=outcome.layers,
                     external=outcome.external, follow_symlinks=outcome.options.data.follow_symlinks)
        checks.append("onnx.checker not run on export folders (onnxruntime operators in the default domain)"
                      if unknown else "onnx.checker not run on export folders")
    else:
        if os.path.isdir(out_path):
            raise InputError(f"output is a folder but the input is a model file: give a .onnx path ({out_path})")
        check_output_path(out_path, outcome.source)
        if unknown:
            checks.append(f"onnx.checker skipped: operators it does not define ({', '.join(unknown)})")
        else:
            checks.append("onnx.checker (full)")
        save_model_atomic(outcome.model, out_path, dummy_feed(outcome.model, seq=3),
                          threads=outcome.options.run.threads, external_data=outcome.external, checker=not unknown)
    outcome.report["checks"] = checks
    outcome.report["output"] = out_path
    return out_path


def summary(report: dict) -> str:
    """The terminal summary of a decoder run."""
    ch = report["interface"]
    lines = [f"Removed {len(report['removed'])} of {ch['layers_before']} decoder layers ({report['form']} form; "
             f"{report['stop_reason']})"]
    for r in report["removed"]:
        lines.append(f"  - layer {r['index']}  ({r['id']})")
    p = report["params"]
    lines.append("")
    lines.append(f"parameters        {p['before']:>12,} -> {p['after']:,}"
                 + (f" ({(p['ratio'] - 1) * 100:+.2f}%)" if p.get("ratio") else ""))
    if report.get("weight_bytes"):
        b = report["weight_bytes"]
        lines.append(f"bytes as stored   {b['before']:>12,} -> {b['after']:,}")
    for k, v in (report.get("perplexity") or {}).items():
        if "before" in v:
            lines.append(f"perplexity ({k}, {v['windows']} windows)  {v['before']:.2f} -> {v['after']:.2f}")
        else:
            lines.append(f"perplexity ({k}, {v['windows']} windows)  -> {v['after']:.2f}")
    sp = report.get("throughput")
    if sp:
        for k in ("prefill_tok_s", "decode_tok_s"):
            lines.append(f"{k.replace('_tok_s', '')} tokens/s (onnxruntime, {sp['before']['threads']} thread(s))  "
                         f"{sp['before'][k]:.0f} -> {sp['after'][k]:.0f}")
    if ch["removed_inputs"]:
        lines.append("")
        lines.append(f"Interface change: {ch['layers_before']} -> {ch['layers_after']} KV-cache layers; inputs "
                     f"removed: {', '.join(ch['removed_inputs'])}; outputs removed: "
                     f"{', '.join(ch['removed_outputs'])}; the remaining caches are renumbered "
                     f"0..{ch['layers_after'] - 1} ({len(ch['renamed'])} renamed).")
    ft = report.get("finetune")
    if ft and ft.get("error"):
        lines.append(f"fine-tuning: {ft['error']}")
    return "\n".join(lines)
