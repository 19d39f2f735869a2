"""Per-block latency on the deployment settings: what removing each block saves, measured.

A block's latency here is its marginal cost in the whole model: the onnxruntime latency of the model minus
that of the model without the block (``graph.surgery.remove_blocks``), on the run's execution providers,
batch and thread count, all graph optimisations. Why not per-node profiling: onnxruntime fuses and renames
nodes (``..._nchwc``, ``BiasGelu``, ``MatMulScaleFusion``, layout ``Reorder*`` nodes between blocks), so its
per-node times do not map back onto the blocks' nodes, and a sub-graph timed alone pays layout conversions
and call overhead the block does not cost inside the model. The marginal cost is what a removal saves,
fusions and layout changes included, which is what a latency target needs.

Measurement: the original and the models without one block each are timed in rounds, a group of ``GROUP``
candidates at a time beside the original: each round runs every model of the group once, back to back
(spinning off, as ``bench.measure_latency`` does for alternated sessions), after 5 warm-up rounds, ``runs``
rounds; a block's saving is the difference of the two models' lower quartiles (``QUANTILE``). The
prediction for a pruned model is the original's latency minus the removed blocks' savings
(``LatencyModel.predict``); ``tools/bench_latency_model.py`` measures its error.

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

__all__ = ["LatencyModel", "measure_block_latency", "GROUP", "RUNS"]

GROUP = 6
"""Candidates timed alongside the original in one alternated group (bounds the sessions held at once)."""
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

    base_ms: the model's latency in ms (its ``QUANTILE`` percentile; the median over the groups). block_ms:
    {block id: ms saved by removing that block alone} (can be slightly negative for a block cheaper than the noise).
    batch_size / threads / providers / runs: the settings it was measured at."""

    base_ms: float
    block_ms: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1
    threads: int | None = None
    providers: tuple[str, ...] = ()
    runs: int = RUNS

    def predict(self, removed: Iterable[str]) -> float:
        """Predicted latency (ms, ``QUANTILE`` percentile) of the model without the blocks ``removed`` (ids): base minus their savings."""
        return self.base_ms - sum(self.block_ms[i] for i in removed)

    def to_json(self) -> dict:
        return {"base_ms": round(self.base_ms, 4), "block_ms": {k: round(v, 4) for k, v in self.block_ms.items()},
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
    bases, saved = [], {}
    for start in range(0, max(len(blocks), 1), GROUP):
        group = list(blocks[start:start + GROUP])
        times = _round_times([model] + [remove_blocks(model, [b]) for b in group], feed, runs, threads)
        typical = np.percentile(times, QUANTILE, axis=1)
        bases.append(float(typical[0]))
        for b, t in zip(group, typical[1:]):
            saved[b.id] = float(typical[0] - t)
    return LatencyModel(float(np.median(bases)), saved, batch, threads, providers, runs)


def _round_times(models: Sequence[onnx.ModelProto], feed: dict[str, np.ndarray], runs: int, threads: int,
                  warmup: int = 5) -> np.ndarray:
    """(len(models), runs) run times in ms: each round runs every model once, back to back, spinning off."""
    sessions = [make_session(m, level=OPT_LEVEL, threads=threads, spinning=False) for m in models]
    feeds = [{i.name: feed[i.name] for i in s.get_inputs()} for s in sessions]
    for _ in range(warmup):
        for s, f in zip(sessions, feeds):
            s.run(None, f)
    times = np.zeros((len(models), runs))
    for r in range(runs):
        for k, (s, f) in enumerate(zip(sessions, feeds)):
            t0 = time.perf_counter()
            s.run(None, f)
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
