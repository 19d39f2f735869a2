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


SHARE_WEIGHTS_BYTES = 256 * 2**20  # models with more initializer bytes than this share them across sessions


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers (stored inline or as external data)."""
    total = 0
    for t in model.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        total += n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return total


class SharedWeights:
    """One copy of a model's initializers as OrtValues, shared by every session built through it.

    Scoring in the global scope runs one suffix session per candidate; each would otherwise hold its own
    copy of the weights after its block (about half the model each). Sessions built here get the weights
    through ``SessionOptions.add_initializer`` from a model whose initializers are stripped to external-data
    stubs (so the model protos are small too). onnxruntime's graph optimisers (Conv+BN fusion already at
    level 'basic', layouts at 'all') read initializers from the file, not from the shared values, so these
    sessions run with graph optimisation off and without weight prepacking (a per-session packed copy of
    every MatMul/Conv weight): slower, but the sessions add no copies of the weights.
    Use as a context manager (a temporary folder holds the stripped models).
    """

    def __init__(self, model: onnx.ModelProto):
        import tempfile

        from onnx import numpy_helper

        self._arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self._values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self._arrays.items()}
        from .graph.ir import STUB_LOCATION

        self._dir = tempfile.TemporaryDirectory(prefix="onnx-consensus-")
        open(os.path.join(self._dir.name, STUB_LOCATION), "wb").close()
        self._stub = STUB_LOCATION
        self._count = 0

    def __enter__(self) -> "SharedWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._dir.cleanup()

    def session(self, model: onnx.ModelProto, *, threads: int | None = None, **_) -> ort.InferenceSession:
        """A session for ``model`` (whose initializers are, by name, those of the shared model)."""
        so = session_options("disable", threads)
        so.add_session_config_entry("session.disable_prepacking", "1")  # prepacked weights are per-session copies
        stripped = onnx.ModelProto()
        stripped.CopyFrom(model)
        for t in stripped.graph.initializer:
            if t.name not in self._values:
                continue  # not the shared model's: keep it inline
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(field)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.EXTERNAL
            t.external_data.add(key="location", value=self._stub)
            so.add_initializer(t.name, self._values[t.name])
        self._count += 1
        path = os.path.join(self._dir.name, f"model{self._count}.onnx")
        onnx.save_model(stripped, path)
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        os.remove(path)
        return sess
