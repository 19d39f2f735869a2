"""onnxruntime sessions: one place that decides session options, threads and optimisation levels.

Instrumented models (extra graph outputs) run with basic optimisation so that fusions cannot swallow the
exposed tensors; clean models (suffix models, benchmarks) run with all optimisations.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(level: str = "all", threads: int | None = None) -> ort.SessionOptions:
    """Session options with the optimisation level named and intra-op threads pinned (None: ORT default)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    return so


def make_session(model: onnx.ModelProto | str | os.PathLike, *, level: str = "all",
                 threads: int | None = None) -> ort.InferenceSession:
    """An InferenceSession on the CPU provider for a model proto or a path (paths work past 2 GB)."""
    so = session_options(level, threads)
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def feed_for(sess: ort.InferenceSession, available: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The subset of ``available`` that ``sess`` takes as inputs (KeyError names a missing one)."""
    feed = {}
    for inp in sess.get_inputs():
        if inp.name not in available:
            raise KeyError(f"no value for session input {inp.name}")
        feed[inp.name] = available[inp.name]
    return feed
