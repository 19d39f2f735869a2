"""``--target-latency F`` for decoder LLMs: how many layers to remove, from one measurement.

Every decoder layer of a model has the same shapes and so costs about the same time; the rest (embedding,
final norm, LM head, onnxruntime's per-run overhead, the feeds) is a fixed cost. So the time of one step with
``k`` layers is ``fixed + k * per_layer``, and two timed models fix both terms: the original (L layers) and a
probe with ``p`` layers removed (default half of them):

    per_layer = (t(L) - t(L - p)) / p        fixed = t(L) - L * per_layer

each ``t`` the median of alternated timings (``rounds`` rounds, the two models in turn, so drift hits both
alike). ``layers_for_target`` then picks the fewest layers ``N`` with ``fixed + (L - N) * per_layer <= F *
t(L)``; the pipeline turns ``--target-latency F`` into ``--remove N``. ``decode``: seconds per generated token
(batch 1, greedy, with the KV cache after a prefill of the prompt); ``prefill``: seconds per prompt token.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ..errors import InputError, TargetError
from .perplexity import throughput

__all__ = ["LayerCost", "TargetCheck", "measure_layer_cost", "layers_for_target", "step_seconds", "meet_target",
           "PHASES"]

PHASES = ("decode", "prefill")


@dataclass(frozen=True)
class LayerCost:
    """The time model of a decoder: ``full_s`` (seconds per token of the original, median), ``probe_s`` (of the
    probe with ``probe_removed`` layers removed), ``per_layer_s`` and ``fixed_s`` (the fit), ``n_layers``,
    ``phase`` (decode | prefill), ``rounds`` (alternated timings each median is over), ``threads``."""

    full_s: float
    probe_s: float
    probe_removed: int
    per_layer_s: float
    fixed_s: float
    n_layers: int
    phase: str
    rounds: int
    threads: int | None

    def predicted_s(self, removed: int) -> float:
        """Predicted seconds per token with ``removed`` layers removed."""
        return self.fixed_s + (self.n_layers - removed) * self.per_layer_s

    def to_json(self) -> dict:
        return asdict(self)


def step_seconds(models: list[onnx.ModelProto], prompt: np.ndarray, *, phase: str = "decode", rounds: int = 7,
                 steps: int = 16, repeats: int = 3, threads: int | None = 1) -> list[float]:
    """Median seconds per token of each of ``models`` on the token ids ``prompt`` (seq,), timed in turn
    ``rounds`` times (``perplexity.throughput``, best of ``repeats`` each: the first run of a session is
    slower)."""
    if phase not in PHASES:
        raise InputError(f"phase must be one of {', '.join(PHASES)}, got {phase!r}")
    key = f"{phase}_tok_s"
    times: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for k, m in enumerate(models):
            times[k].append(1.0 / throughput(m, prompt, steps=steps, repeats=repeats, threads=threads)[key])
    return [float(np.median(t)) for t in times]


def measure_layer_cost(model: onnx.ModelProto, prompt: np.ndarray, *, phase: str = "decode",
                       probe_removed: int | None = None, rounds: int = 7, steps: int = 16,
                       threads: int | None = 1) -> LayerCost:
    """Time ``model`` (a decoder with a KV cache) and a probe without its last ``probe_removed`` layers
    (default half of them), alternately, on ``prompt`` (seq,) token ids; fit ``LayerCost``. A fit whose
    per-layer time is not positive (timing noise above the layers' cost) raises TargetError."""
    from ..graph.decoder import find_decoder_layers
    from ..graph.kv_surgery import remove_layers

    report = find_decoder_layers(model)
    n = len(report.layers)
    p = probe_removed if probe_removed is not None else max(1, n // 2)
    if not 1 <= p < n:
        raise InputError(f"probe_removed must be in 1..{n - 1}, got {p}")
    probe = remove_layers(model, [layer.index for layer in report.layers[n - p:]], report=report)
    full, part = step_seconds([model, probe], prompt, phase=phase, rounds=rounds, steps=steps, threads=threads)
    per_layer = (full - part) / p
    if per_layer <= 0:
        raise TargetError(f"decoder layers cost no measurable {phase} time ({full * 1e3:.3f} ms per token with "
                          f"{n} layers, {part * 1e3:.3f} ms with {n - p}): a latency target cannot be mapped to layers")
    return LayerCost(full, part, p, per_layer, full - n * per_layer, n, phase, rounds, threads)


def layers_for_target(cost: LayerCost, fraction: float, *, keep: int = 1) -> int:
    """The fewest layers to remove so that the predicted time is at most ``fraction`` of the original's
    (``fraction`` in (0, 1]); at least ``keep`` layers stay. Raises TargetError when even that many removed
    layers miss the target (the fixed cost alone is above it)."""
    if not 0 < fraction <= 1:
        raise InputError(f"--target-latency must be in (0, 1], got {fraction}")
    goal = fraction * cost.full_s
    need = math.ceil((cost.full_s - goal) / cost.per_layer_s - 1e-9) if cost.full_s > goal else 0
    limit = cost.n_layers - keep
    if need > limit:
        raise TargetError(f"--target-latency {fraction}: removing {limit} of {cost.n_layers} layers leaves "
                          f"{cost.predicted_s(limit) / cost.full_s:.0%} of the {cost.phase} time (the layers are "
                          f"{cost.n_layers * cost.per_layer_s / cost.full_s:.0%} of it)")
    return max(need, 0)


@dataclass
class TargetCheck:
    """What ``meet_target`` wrote: ``removed`` (layer numbers), ``model``, ``met``, and every ``attempts`` entry
    {removed, measured_s, original_s, ratio} (the original and the candidate timed together)."""

    removed: list[int]
    model: onnx.ModelProto
    met: bool
    attempts: list[dict] = field(default_factory=list)


def meet_target(model: onnx.ModelProto, order: Sequence[int], fraction: float, cost: LayerCost,
                prompt: np.ndarray, *, attempts: int = 3, rounds: int = 7, steps: int = 16,
                threads: int | None = 1) -> TargetCheck:
    """Remove the first ``layers_for_target(cost, fraction)`` layers of ``order`` (layer numbers, least
    important first) and time the result beside the original (``step_seconds``, ``cost.phase``); while it
    misses ``fraction`` of the original's time, remove one more layer of ``order`` (at most ``attempts``
    timings, one layer always kept). ``met`` says whether the last one met it."""
    from ..graph.kv_surgery import remove_layers

    n = layers_for_target(cost, fraction)
    check = TargetCheck([], model, False)
    for _ in range(attempts):
        removed = list(order[:n])
        pruned = remove_layers(model, removed) if removed else model
        full, got = step_seconds([model, pruned], prompt, phase=cost.phase, rounds=rounds, steps=steps,
                                 threads=threads)
        check.removed, check.model, check.met = removed, pruned, got <= fraction * full
        check.attempts.append({"removed": removed, "measured_s": got, "original_s": full, "ratio": got / full})
        if check.met or n + 1 > min(len(order), cost.n_layers - 1):
            break
        n += 1
    return check
