"""onnxruntime latency benchmark: warm-up, then timed runs alternated across models, median and p90.

Clean models only (never instrumented ones), all graph optimisations, intra-op threads pinned.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .batching import calibration_shapes, fixed_batch, tile_feed
from .errors import InputError
from .runtime import make_session

OPT_LEVEL = "all"


@dataclass
class Latency:
    """Per-batch latency in milliseconds over ``runs`` timed runs."""

    batch_size: int
    median_ms: float
    p90_ms: float
    runs: int
    threads: int
    opt_level: str = OPT_LEVEL
    spinning: bool = True

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class LatencyChange:
    """A model and its pruned copy timed alternately on one feed (``measure_latency``): the report's
    ``latency[batch]`` entry."""

    before: Latency
    after: Latency

    def to_json(self) -> dict:
        """{before_ms, after_ms (medians), before_p90_ms, after_p90_ms, threads, opt_level, runs, spinning}."""
        b, a = self.before, self.after
        return {"before_ms": b.median_ms, "after_ms": a.median_ms, "before_p90_ms": b.p90_ms,
                "after_p90_ms": a.p90_ms, "threads": b.threads, "opt_level": b.opt_level, "runs": b.runs,
                "spinning": b.spinning}


@dataclass
class BenchRow:
    """One row of `onnx-cprune bench`: ``model`` (its path) timed (``latency``), ``ratio`` of its median to the
    first model's at the same batch, its MACs (None when unknown) and parameters; with evaluation data, its
    accuracy (None without labels), top-1 agreement with the first model, relative error and sample count."""

    model: str
    latency: Latency
    ratio: float
    macs: int | None
    params: int
    accuracy: float | None = None
    agreement: float | None = None
    rel_error: float | None = None
    eval_samples: int | None = None

    def to_json(self) -> dict:
        """{model, batch_size, median_ms, p90_ms, ratio, macs, params, threads, runs, opt_level, spinning} and,
        when evaluated, accuracy, agreement, rel_error, eval_samples."""
        lat = self.latency
        out = {"model": self.model, "batch_size": lat.batch_size, "median_ms": lat.median_ms, "p90_ms": lat.p90_ms,
               "ratio": self.ratio, "macs": self.macs, "params": self.params, "threads": lat.threads,
               "runs": lat.runs, "opt_level": lat.opt_level, "spinning": lat.spinning}
        if self.eval_samples is not None:
            out.update(accuracy=self.accuracy, agreement=self.agreement, rel_error=self.rel_error,
                       eval_samples=self.eval_samples)
        return out


def random_feed(model: onnx.ModelProto, batch_size: int, sample: dict[str, np.ndarray] | None = None,
                seed: int = 0, *, axes: dict[str, int | None] | None = None,
                input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    """A feed of ``batch_size`` samples: tiled from ``sample`` (one real batch) along each input's batch axis
    (``axes``, default 0; None: fed as given) when given, else random data of each input's static shape, or
    of ``input_shapes[name]`` (its batch dim replaced). Raises InputError for an input with dynamic non-batch
    dims and no shape for it (a 1 there would time a 1x1 image)."""
    if sample is not None:
        return tile_feed(sample, batch_size, axes or {})
    rng = np.random.default_rng(seed)
    from .graph.ir import interface

    feed = {}
    missing = []
    for spec in interface(model)[0]:
        given = (input_shapes or {}).get(spec.name)
        if given is not None:
            shape = [batch_size, *given[1:]] if len(given) else []
        elif spec.shape is None or any(not (isinstance(d, int) and d > 0) for d in spec.shape[1:]):
            dims = "rank unknown" if spec.shape is None else ", ".join(
                f"dim {k} ({d if d else '?'})" for k, d in enumerate(spec.shape)
                if k and not (isinstance(d, int) and d > 0))
            missing.append(f"{spec.name!r}: {dims}")
            continue
        else:
            shape = [batch_size, *spec.shape[1:]] if len(spec.shape) else []
        dt = np.dtype(spec.dtype)
        feed[spec.name] = (rng.integers(0, 2, shape) if dt.kind in "iub" else rng.standard_normal(shape)).astype(dt)
    if missing:
        raise InputError("dynamic non-batch dims in model input(s) " + "; ".join(missing)
                         + ": give --data DIR (real inputs) or --input-shape NAME:1x3x224x224 to time it")
    return feed


def measure_latency(models: Sequence[onnx.ModelProto], feed: dict[str, np.ndarray], *, runs: int = 30,
                    warmup: int = 5, threads: int = 1, spinning: bool | None = None) -> list[Latency]:
    """Latency of each model on the same ``feed``; runs alternate between models so drift hits all alike.

    spinning (default: only when one model is timed): onnxruntime's intra-op threads spin-wait after a run.
    With several sessions alternating, the spinning threads of the session that just ran steal cores from
    the next one (ResNet-56 at batch 64 on 2 threads: 60 ms alone, 90 ms alternated with spinning;
    docs/BENCHMARKS.md, "Speed"), so alternated sessions run with spinning off."""
    spinning = len(models) == 1 if spinning is None else spinning
    sessions = [make_session(m, level=OPT_LEVEL, threads=threads, spinning=spinning) for m in models]
    feeds = [{i.name: feed[i.name] for i in s.get_inputs()} for s in sessions]
    for _ in range(warmup):
        for s, f in zip(sessions, feeds):
            s.run(None, f)
    times = [[] for _ in sessions]
    for _ in range(runs):
        for k, (s, f) in enumerate(zip(sessions, feeds)):
            t0 = time.perf_counter()
            s.run(None, f)
            times[k].append((time.perf_counter() - t0) * 1e3)
    bs = len(next(iter(feed.values())))
    return [Latency(bs, float(np.median(t)), float(np.percentile(t, 90)), runs, threads, spinning=spinning)
            for t in times]


def compare_models(paths: Sequence[str], *, batch_sizes: Sequence[int] = (1, 32), runs: int = 30, warmup: int = 5,
                   threads: int = 1, spinning: bool | None = None, data: str | None = None, eval_data: str | None = None,
                   input_shapes: dict[str, tuple[int, ...]] | None = None) -> list[BenchRow]:
    """`onnx-cprune bench`: one ``BenchRow`` per batch size and model (latency, ratio to the first model, MACs,
    parameters); inputs tiled from the data directory ``data`` or random; with ``eval_data``, accuracy
    (labels.npy) and agreement with the first model on it."""
    from .graph.flops import count_cost
    from .graph.ir import load_model

    from .graph.ir import interface

    models = [load_model(p) for p in paths]
    sample, axes = None, {}
    if data:
        from .data import load_calibration

        calib = load_calibration(data, models[0])
        sample, axes = next(calib.batches(max(batch_sizes))), calib.batch_axes
        if not input_shapes:
            input_shapes = calibration_shapes(interface(models[0])[0], calib)
            if input_shapes:
                import logging

                logging.getLogger("onnx_consensus").warning(
                    "MACs at the data's shapes (first sample): %s",
                    ", ".join(f"{k}:{'x'.join(map(str, v)) or 'scalar'}" for k, v in input_shapes.items()))
    else:
        random_feed(models[0], 1, input_shapes=input_shapes)  # refuses dynamic dims it cannot fill, up front
    costs = [count_cost(m, input_shapes or {}) for m in models]
    fixed = fixed_batch(interface(models[0])[0])
    if fixed and set(batch_sizes) != {fixed}:
        import logging

        logging.getLogger("onnx_consensus").warning("the model has a fixed batch of %d: timed at batch %d only",
                                                    fixed, fixed)
        batch_sizes = [fixed]
    rows = []
    for bs in batch_sizes:
        feed = random_feed(models[0], bs, sample, axes=axes, input_shapes=input_shapes)
        lats = measure_latency(models, feed, runs=runs, warmup=warmup, threads=threads, spinning=spinning)
        for path, lat, cost in zip(paths, lats, costs):
            rows.append(BenchRow(path, lat, lat.median_ms / lats[0].median_ms, cost.total_macs, cost.params))
    if eval_data:
        _evaluate_rows(paths, models, eval_data, threads, rows)
    return rows


def _evaluate_rows(paths, models, eval_data: str, threads: int, rows: list[BenchRow]) -> None:
    """Fill accuracy / agreement with the first model into ``rows`` (same values for every batch size)."""
    from .data import load_calibration
    from .evaluate import compare, reference_outputs

    data = load_calibration(eval_data, models[0])
    idx = np.arange(data.n_samples)
    outs = [reference_outputs(m, data, idx, threads=threads) for m in models]
    for k, out in enumerate(outs):
        f = compare(out, outs[0], data.labels)
        for r in rows:
            if r.model == paths[k]:
                r.accuracy, r.agreement, r.rel_error, r.eval_samples = f.accuracy, f.agreement, f.rel_error, f.n
