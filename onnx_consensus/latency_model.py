"""Per-block latency on the deployment settings: what removing each block saves, measured.

A block's latency here is its marginal cost in the whole model: the onnxruntime latency of the model minus
that of the model without the block (``graph.surgery.remove_blocks``), on the run's execution providers,
batch and thread count, all graph optimisations. Why not per-node profiling: onnxruntime fuses and renames
nodes (``..._nchwc``, ``BiasGelu``, ``MatMulScaleFusion``, layout ``Reorder*`` nodes between blocks), so its
per-node times do not map back onto the blocks' nodes, and a sub-graph timed alone pays layout conversions
and call overhead the block does not cost inside the model. The marginal cost is what a removal saves,
fusions and layout changes included, which is what a latency target needs.

Measurement: the original and the models without one block each are timed in rounds, ``GROUP`` candidate
at a time beside the original: each round runs every model of the group once, back to back
(spinning off, as ``bench.measure_latency`` does for alternated sessions), after 5 warm-up rounds, ``runs``
rounds; a block's saving is the difference of the two models' lower quartiles (``QUANTILE``). The
prediction for a pruned model is the original's latency minus the removed blocks' savings
(``LatencyModel.predict``); ``tools/bench/latency_model.py`` measures its error.

Cache: in memory, per process, keyed by (sha256 of the serialized graph, providers, batch, threads). Not
on disk on purpose: a latency is only valid for the machine's state when it was measured (other processes,
frequency, thermal state), and a figure reused from another day's load would mislead the target.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from .bench import OPT_LEVEL
from .graph.blocks import Block
from .graph.surgery import remove_blocks
from .runtime import current_providers, make_session, provider_names

__all__ = ["LatencyModel", "measure_block_latency", "model_latency", "round_times", "GROUP", "RUNS", "QUANTILE"]

GROUP = 1
"""Candidates timed alongside the original in one alternated group. One: each model without a block is timed
in pairs with the original, as the written model is (``pipeline``'s before/after latency). With more models
per group every model runs slower (each evicts the others' weights from the caches: the ViT at batch 1 timed
among 7 models, 0.30 ms; beside one other, 0.19-0.26 ms), and that difference would pass for savings."""
RUNS = 40
"""Timed runs per model (after 5 warm-up rounds) when the caller gives none."""
QUANTILE = 25
"""The percentile of a model's run times taken as its latency here. Not the median: on a machine shared with
other processes a run that the scheduler preempts takes a time slice longer (ResNet-56 at batch 1 on a
loaded 2-core machine: 1.8 ms or 5.8 ms, with more than half the runs slow in some groups), so medians jump
by whole slices between models and a block's saving comes out at -4 ms or +4 ms of a 3 ms model; the lower
quartile is the undisturbed run time, and equals the median on an idle machine."""

_CACHE: dict[tuple, LatencyModel] = {}


@dataclass
class LatencyModel:
    """Measured latency of a model and of each removable block.

    base_ms: the model's latency in ms (its ``QUANTILE`` percentile; the median over the groups). floor_ms:
    the latency with every candidate removed. marginal_ms: {block id: ms saved by removing that block alone}
    (slightly negative for a block cheaper than the noise). block_ms: the marginal savings (negatives as 0)
    scaled to add up to base_ms - floor_ms: single removals are not additive (the ViT at batch 1: the first
    removed sub-block saves 15% of 0.2 ms, the next ones 7% each, ten of twelve 78%), so the ends are measured
    and the blocks share the difference in proportion to their marginal costs.
    batch_size / threads / providers / runs: the settings it was measured at."""

    base_ms: float
    block_ms: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1
    threads: int | None = None
    providers: tuple[str, ...] = ()
    runs: int = RUNS
    floor_ms: float | None = None
    marginal_ms: dict[str, float] = field(default_factory=dict)

    def predict(self, removed: Iterable[str]) -> float:
        """Predicted latency (ms, ``QUANTILE`` percentile) without the blocks ``removed`` (ids): base minus their
        savings."""
        return self.base_ms - sum(self.block_ms[i] for i in removed)

    def to_json(self) -> dict:
        return {"base_ms": round(self.base_ms, 4), "block_ms": {k: round(v, 4) for k, v in self.block_ms.items()},
                "floor_ms": None if self.floor_ms is None else round(self.floor_ms, 4),
                "marginal_ms": {k: round(v, 4) for k, v in self.marginal_ms.items()},
                "batch_size": self.batch_size, "threads": self.threads, "providers": list(self.providers),
                "runs": self.runs}


def measure_block_latency(model: onnx.ModelProto, blocks: Sequence[Block], feed: dict[str, np.ndarray], *,
                          threads: int | None = None, runs: int | None = None) -> LatencyModel:
    """The LatencyModel of ``model`` for ``blocks`` on ``feed`` (its batch is the batch measured), cached per
    process by graph hash, providers, batch and threads. ``threads`` None: all cores."""
    threads = threads or os.cpu_count()
    runs = runs or RUNS
    batch = len(next(iter(feed.values()))) if feed else 1
    providers = tuple(provider_names(current_providers()))
    key = (hashlib.sha256(model.SerializeToString()).hexdigest(), providers, batch, threads, runs,
           tuple(b.id for b in blocks))
    if key not in _CACHE:
        _CACHE[key] = _measure(model, blocks, feed, threads, runs, providers, batch)
    return _CACHE[key]


def _measure(model, blocks, feed, threads, runs, providers, batch) -> LatencyModel:
    bases, marginal = [], {}
    for start in range(0, len(blocks), GROUP):
        group = list(blocks[start:start + GROUP])
        typical = np.percentile(round_times([model] + [remove_blocks(model, [b]) for b in group], feed, runs,
                                            threads), QUANTILE, axis=1)
        bases.append(float(typical[0]))
        for b, t in zip(group, typical[1:]):
            marginal[b.id] = float(typical[0] - t)
    # the other end: every candidate removed, timed beside the original
    ends = np.percentile(round_times([model, remove_blocks(model, blocks)] if blocks else [model], feed, runs,
                                     threads), QUANTILE, axis=1)
    bases.append(float(ends[0]))
    base = float(np.median(bases))
    floor = float(ends[-1]) if blocks else base
    positive = {k: max(v, 0.0) for k, v in marginal.items()}
    total = sum(positive.values())
    scale = (base - floor) / total if total > 0 else 0.0
    return LatencyModel(base, {k: v * scale for k, v in positive.items()}, batch, threads, providers, runs,
                        floor_ms=floor, marginal_ms=marginal)


def round_times(models: Sequence[onnx.ModelProto], feed: dict[str, np.ndarray], runs: int, threads: int,
                  warmup: int = 5) -> np.ndarray:
    """(len(models), runs) run times in ms: each round runs every model once, back to back, spinning off, the
    order rotated by one model per round (the model that runs first in a round was measured slower)."""
    sessions = [make_session(m, level=OPT_LEVEL, threads=threads, spinning=False) for m in models]
    feeds = [{i.name: feed[i.name] for i in s.get_inputs()} for s in sessions]
    for _ in range(warmup):
        for s, f in zip(sessions, feeds):
            s.run(None, f)
    n = len(sessions)
    times = np.zeros((n, runs))
    for r in range(runs):
        for j in range(n):  # each round starts one model later: no model always runs first (a colder cache)
            k = (r + j) % n
            t0 = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k, r] = (time.perf_counter() - t0) * 1e3
    return times


def model_latency(model: onnx.ModelProto, *, unit: str = "block", input_shapes: dict | None = None,
                  batch_size: int = 1, threads: int | None = None, runs: int | None = None) -> LatencyModel:
    """``measure_block_latency`` of every removable block of ``model`` (``unit`` as in ``find_blocks``) on random
    inputs of its static shapes (``input_shapes`` for dynamic ones; ``bench.random_feed``), at ``batch_size``
    (the model's fixed batch, when it has one). For `inspect --latency`."""
    from .batching import fixed_batch
    from .bench import random_feed
    from .graph.blocks import find_blocks
    from .graph.ir import interface

    blocks = find_blocks(model, macs_per_node={}, unit=unit).blocks
    feed = random_feed(model, fixed_batch(interface(model)[0]) or batch_size, input_shapes=input_shapes)
    return measure_block_latency(model, blocks, feed, threads=threads, runs=runs)
