"""A decoder run's latency target (``--target-latency F``, ``--target-latency-ms T``) and ``--quantize``: the
decoder part of issue 24, called by ``llm.run.prune_decoder``.

Latency target: the time measured is the decode time per generated token (batch 1, greedy with the KV cache
after a prefill of the first calibration window, ``--threads`` or 1 onnxruntime thread), the time a deployed
decoder spends on most of its tokens. Every layer costs about the same, so the time model is one fit
(``layer_latency.measure_layer_cost``: the original and a probe without half its layers, timed alternately,
medians) and the target is a layer count: the fewest layers ``N`` whose predicted time is at most ``F`` of the
original's (``layers_for_target``; ``T`` ms is the fraction ``T`` / the original's measured time, at most 1).
The layers are those the run's schedule and criterion remove first (``--only``, ``--exclude`` and
``--keep-per-stage`` apply); the schedule runs ``ATTEMPTS - 1`` layers deeper than ``N`` so that the check
can go on without scoring again. The check (``layer_latency.meet_target``): the original without the first
``N`` layers is timed beside the original (medians of ``ROUNDS`` alternated rounds), and while it misses the
fraction of the original timed in the same rounds one more layer goes and it is timed again, at most
``ATTEMPTS`` timings; a miss after those is a TargetError (exit 3, nothing written). Fine-tuning after the
removals changes weights, not the time; ``--quantize`` after them is measured in its own rows.

Quantization (``--quantize int8|int4|fp16``, ``llm.quantize``): the pruned model (fine-tuned when asked) is
quantized and written; the four rows (original, quantized, pruned, pruned + quantized;
``llm.variants.measure_decoder_variants``) are measured in the same run: held-out perplexity on the hold-out
windows, parameters, bytes on disk, prefill and decode tokens/s (not timed with ``--no-latency``). With
nothing removed (``--remove 0``) the written model is the original quantized.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import onnx

from ..errors import InputError, TargetError
from ..latency_target import wanted_ms
from ..options import Options
from .batching import decoder_batch
from .layer_latency import layers_for_target, measure_layer_cost, meet_target
from .layers import allowed_layers
from .quantize import check_quantizable
from .variants import decoder_table_lines, measure_decoder_variants

log = logging.getLogger("onnx_consensus")
__all__ = ["ATTEMPTS", "ROUNDS", "STEPS", "wants_latency", "check_deploy_options", "meet_latency",
           "quantize_outcome", "deploy_lines"]

ATTEMPTS = 3
"""Timings of the pruned model at most (one more layer each), as the block path's attempts."""
ROUNDS = 7
"""Alternated rounds each timing's medians are over (the time model's and the check's)."""
STEPS = 16
"""Greedy decode steps per timed run."""


def wants_latency(options: Options) -> bool:
    """Whether the run has a latency target."""
    return options.target.target_latency is not None or options.target.target_latency_ms is not None


def check_deploy_options(model: onnx.ModelProto, options: Options) -> None:
    """InputError in one line, before anything is scored or timed: a latency target with ``--remove`` or
    ``--plan``, both latency targets, one out of range (``latency_target.wanted_ms``'s checks); ``--quantize``
    with an unknown format or an already quantized model (``quantize.check_quantizable``)."""
    t = options.target
    if wants_latency(options):
        if t.remove is not None or t.plan:
            raise InputError("a latency target cannot be combined with --remove, --target-flops or --plan")
        wanted_ms(1.0, t.target_latency, t.target_latency_ms)
    if options.output.quantize:
        check_quantizable(model, options.output.quantize)


def meet_latency(model: onnx.ModelProto, report, prompt: np.ndarray, options: Options, choose):
    """(the layer numbers removed, the scoring rounds that removed them, the stop reason, the report's
    ``latency_target``) for ``model`` (the original decoder; ``report`` its ``DecoderReport``) on ``prompt``
    (seq,) token ids. ``choose(options)``: the run's schedule, (layer order, rounds, stop reason) for
    ``options.target.remove`` layers. Raises TargetError when the target cannot be met."""
    t, threads = options.target, options.run.threads or 1
    _, limit = allowed_layers(report, t)
    if limit < 1:
        raise TargetError(f"--target-latency: no decoder layer may be removed (--keep-per-stage "
                          f"{t.keep_per_stage}, --only/--exclude)")
    cost = measure_layer_cost(model, prompt, rounds=ROUNDS, steps=STEPS, threads=threads)
    base_ms = cost.full_s * 1e3
    target_ms = wanted_ms(base_ms, t.target_latency, t.target_latency_ms)
    fraction = min(target_ms / base_ms, 1.0)
    need = layers_for_target(cost, fraction, keep=cost.n_layers - limit)
    info = {"target_ms": target_ms, "fraction": t.target_latency, "batch_size": 1, "choice": "damage",
            "statistic": f"median of {ROUNDS} alternated rounds", "phase": cost.phase,
            "unit": "ms per generated token", "layers_for_target": need, "model": cost.to_json(), "attempts": []}
    if need == 0:  # the original meets it (a --target-latency-ms above its measured time)
        info.update(measured_ms=base_ms, original_ms=base_ms, goal_ms=target_ms, met=True)
        return [], [], "the original meets the latency target: nothing to remove", info
    order, scored, _ = choose(replace(options, target=replace(t, remove=min(need + ATTEMPTS - 1, limit))))
    check = meet_target(model, order, fraction, cost, prompt, attempts=ATTEMPTS, rounds=ROUNDS, steps=STEPS,
                        threads=threads)
    for a in check.attempts:
        info["attempts"].append({"removed": len(a["removed"]), "layers": a["removed"],
                                 "predicted_ms": cost.predicted_s(len(a["removed"])) * 1e3,
                                 "measured_ms": a["measured_s"] * 1e3, "original_ms": a["original_s"] * 1e3,
                                 "goal_ms": fraction * a["original_s"] * 1e3})
    last = info["attempts"][-1]
    info.update(measured_ms=last["measured_ms"], original_ms=last["original_ms"], goal_ms=last["goal_ms"],
                met=check.met)
    if not check.met:
        raise TargetError(f"latency target {last['goal_ms']:.3f} ms per token not met after "
                          f"{len(check.attempts)} timings: the model without {last['removed']} of "
                          f"{cost.n_layers} layers measured {last['measured_ms']:.3f} ms (original "
                          f"{last['original_ms']:.3f} ms)")
    n = len(check.removed)
    log.info("latency target: %d layer(s) removed, %.3f ms per token against %.3f ms", n, last["measured_ms"],
             last["goal_ms"])
    kept = scored[:n] if options.criterion.schedule == "iterative" else scored  # the rounds of the removals
    return check.removed, kept, f"latency target met with {n} layer(s) removed", info


def quantize_outcome(original: onnx.ModelProto, outcome, windows: np.ndarray, prompt: np.ndarray,
                     options: Options) -> dict:
    """Quantize ``outcome.model`` (the pruned, maybe fine-tuned decoder) to ``--quantize``, in place, and return
    the report's ``quantize`` (the four rows: perplexity on ``windows`` (n, seq) int64, throughput on
    ``prompt`` (seq,) token ids unless ``--no-latency``)."""
    run, out = options.run, options.output
    v = measure_decoder_variants(original, outcome.model, out.quantize, windows,
                                 prompt=prompt if out.latency else None, steps=max(4, out.latency_runs),
                                 repeats=3, threads=run.threads or 1,
                                 batch_size=decoder_batch(windows.shape[-1], run.batch_size))
    outcome.model = v.model
    return v.to_json()


def deploy_lines(report: dict) -> list[str]:
    """The decoder summary's tail: the latency target's outcome and the --quantize table."""
    lines: list[str] = []
    lt = report.get("latency_target")
    if lt:
        share = lt["fraction"] if lt.get("fraction") is not None else lt["goal_ms"] / lt["original_ms"]
        goal = (f"{share:.3g} x the original's {lt['original_ms']:.3f} ms timed beside it"
                + ("" if lt.get("fraction") is not None else f"; --target-latency-ms {lt['target_ms']:g} as a "
                   "share of the original's first measurement"))
        timings = f" after {len(lt['attempts'])} timings" if len(lt["attempts"]) > 1 else ""
        lines += ["", f"Decode time of the written model (batch 1, {lt['unit']}, {lt['statistic']}): "
                      f"{lt['measured_ms']:.3f} ms measured against the target {lt['goal_ms']:.3f} ms ({goal}): "
                      + ("met" if lt["met"] else "NOT met") + timings
                      + f"; the time model predicted {lt['layers_for_target']} layer(s)"]
    q = report.get("quantize")
    if q:
        lines += ["", f"--quantize {q['format']}: perplexity on {q['samples']} held-out windows, the {q['written']} "
                      "model written"] + ["  " + ln for ln in decoder_table_lines(q)]
    return lines
