"""onnxruntime sessions: one place that decides session options, threads and optimisation levels.
Where weights live (external data, stubs) is ``graph.weights``' business; sessions get them from there.

Instrumented models (extra graph outputs) run with basic optimisation so that fusions cannot swallow the
exposed tensors; clean models (suffix models, benchmarks) run with all optimisations.

Execution providers (``--providers cuda,cpu``): ``resolve_providers`` turns the user's names into
onnxruntime's provider list, checked against the installed build; ``using_providers`` makes that list the
one every session built here uses (scoring, fidelity, latency, the fine-tuning teacher, the write check)
for the duration of a ``with`` block, so the option reaches every session without being passed through
every function. Outside such a block sessions use the CPU provider.
"""
from __future__ import annotations

import contextvars
import functools
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .errors import InputError
from .graph.weights import (STUB_LOCATION, all_tensors, external_array, has_external_tensors, inline_external,
                            is_external, make_stub)
from .heap import unpool_large_blocks

log = logging.getLogger("onnx_consensus")

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


# ------------------------------------------------------------------------------ execution providers

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
"""Short names accepted by ``--providers`` (full onnxruntime names are accepted too)."""

GPU_HINT = "pip install 'onnx-consensus[gpu]' (onnxruntime-gpu, in place of onnxruntime)"
CPU = "CPUExecutionProvider"

_PROVIDERS: contextvars.ContextVar[tuple] = contextvars.ContextVar("onnx_consensus_providers", default=(CPU,))


def _provider_name(spec: str) -> tuple[str, dict[str, str]]:
    """'cuda' -> ('CUDAExecutionProvider', {}); 'cuda:1' -> ('CUDAExecutionProvider', {'device_id': '1'})."""
    name, _, index = spec.strip().partition(":")
    full = PROVIDER_NAMES.get(name.lower(), name)
    if not full.endswith("ExecutionProvider"):
        raise InputError(f"unknown onnxruntime provider {spec!r}: use {', '.join(PROVIDER_NAMES)} or a full name "
                         "such as CUDAExecutionProvider")
    if index and not index.isdigit():
        raise InputError(f"provider {spec!r}: the device index after ':' must be an integer")
    return full, ({"device_id": index} if index else {})


def resolve_providers(names: Sequence[str] | None, available: Sequence[str] | None = None,
                      device_id: int | None = None) -> tuple:
    """onnxruntime's provider list for the user's ``names`` (e.g. ('cuda', 'cpu'); None or empty: CPU).

    A provider this onnxruntime build lacks (``available``: default ``ort.get_available_providers()``) is
    dropped with a warning when a provider that is installed follows it in the list (``cuda,cpu``: fall back
    to the CPU), and is an InputError otherwise (``cuda`` alone: the user asked for that device only).
    ``device_id``: the device of providers given without an index (``cuda`` under torchrun: the rank's
    LOCAL_RANK); ``cuda:k`` keeps k. Entries are names or (name, provider options) pairs."""
    if not names:
        return (CPU,)
    available = list(ort.get_available_providers() if available is None else available)
    wanted = [_provider_name(n) for n in names]
    out, missing = [], []
    for full, opts in wanted:
        if full not in available:
            missing.append(full)
            continue
        if device_id is not None and not opts and full != CPU:
            opts = {"device_id": str(device_id)}
        if full not in [o if isinstance(o, str) else o[0] for o in out]:
            out.append((full, opts) if opts else full)
    if missing:
        hint = GPU_HINT if any(m in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for m in missing) else \
            "install an onnxruntime build that has it"
        if not out:
            raise InputError(f"onnxruntime provider {', '.join(missing)} is not available in this onnxruntime "
                             f"(available: {', '.join(available)}); {hint}, or add cpu to --providers to fall back")
        log.warning("onnxruntime provider %s is not available (available: %s); falling back to %s. %s",
                    ", ".join(missing), ", ".join(available), ", ".join(o if isinstance(o, str) else o[0]
                                                                       for o in out), hint)
    return tuple(out)


@contextmanager
def using_providers(providers: Sequence | None) -> Iterator[tuple]:
    """``with using_providers(resolve_providers(["cuda", "cpu"])):`` every session built here inside the
    block (in this thread / context) runs on those providers. None: leave the current setting."""
    if providers is None:
        yield current_providers()
        return
    token = _PROVIDERS.set(tuple(providers))
    try:
        yield tuple(providers)
    finally:
        _PROVIDERS.reset(token)


def current_providers() -> tuple:
    """The provider list sessions get now (``using_providers``), CPU by default."""
    return _PROVIDERS.get()


def provider_names(providers: Sequence | None = None) -> list[str]:
    """Short names of a provider list (default: the current one), for reports: ['cuda', 'cpu']."""
    short = {v: k for k, v in PROVIDER_NAMES.items()}
    out = []
    for p in current_providers() if providers is None else providers:
        name, opts = (p, {}) if isinstance(p, str) else p
        s = short.get(name, name)
        out.append(f"{s}:{opts['device_id']}" if "device_id" in opts else s)
    return out


def _session(source, so: ort.SessionOptions) -> ort.InferenceSession:
    return ort.InferenceSession(source, so, providers=list(current_providers()))


# ------------------------------------------------------------------------------ sessions

SHARED_ARENA = "shared"
"""``arena=SHARED_ARENA``: one CPU arena for the whole process, which every session built with it draws from."""

SHARED_ARENA_STRATEGY = 1
"""The shared arena grows by what is asked (onnxruntime's kSameAsRequested), not to the next power of two."""


def session_options(level: str = "all", threads: int | None = None, *, spinning: bool = True,
                    arena: bool | str = True, prepack: bool = True) -> ort.SessionOptions:
    """Session options with the optimisation level named and intra-op threads pinned (None: ORT default).
    ``spinning=False``: the intra-op threads sleep as soon as a run ends instead of spin-waiting for the next.
    ``arena``: where a run's intermediate tensors live.
    - True: the session's own CPU arena, which keeps its peak for the life of the session (and grows by powers
      of two): memory multiplies with the number of live sessions.
    - ``SHARED_ARENA``: one arena for the process (``shared_arena``), grown by what is asked and reused by
      every session built with it, one run after another: the peak is the largest run's, however many sessions
      come and go (the decoder scorer builds one per candidate). Never handed back before the process ends.
    - False: no arena; each tensor is a ``malloc`` given back when freed (``heap.unpool_large_blocks``: glibc
      would otherwise keep the large ones). Bounded like the shared arena, but the 1.0B optimum decoder's
      forward pass took 26 % more CPU seconds than with it (32.8 against 26.1, ``tools/bench/decoder_pass.py``;
      docs/BENCHMARKS.md): every large block is a fresh mapping of zeroed pages.
    ``prepack=False``: no packed copy of the weights (kernels read them as stored)."""
    so = ort.SessionOptions()
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if arena == SHARED_ARENA:
        shared_arena()
        so.add_session_config_entry("session.use_env_allocators", "1")
    so.enable_cpu_mem_arena = bool(arena)
    if not arena:
        unpool_large_blocks()  # freed activations go back to the system (heap.py)
    so.graph_optimization_level = LEVELS[level]
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    return so


@functools.cache
def shared_arena() -> None:
    """Register the process-wide CPU arena with onnxruntime's environment, once (``SHARED_ARENA``)."""
    cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(0, SHARED_ARENA_STRATEGY, -1, -1))


def make_session(model: onnx.ModelProto | str | os.PathLike, *, level: str = "all", threads: int | None = None,
                 spinning: bool = True, arena: bool | str = True, prepack: bool = True) -> ort.InferenceSession:
    """An InferenceSession on the current providers (``using_providers``; CPU by default) for a model proto or
    a path (paths work past 2 GB).

    A proto whose weights stay in external-data files (``graph.ir.load_model_and_layout``) gets them as
    memory-mapped arrays shared by every session of the process (``graph.weights.external_array``), with graph
    optimisation off and no weight prepacking, so no session holds a copy of them. ``arena``: as
    ``session_options`` (shared for the decoder path's sessions, off for the block scorer's and the
    evaluation's, on for latency); ``prepack``: as
    ``session_options``."""
    if not isinstance(model, (str, os.PathLike)) and has_external_tensors(model):
        return _external_session(model, threads, spinning, arena)
    so = session_options(level, threads, spinning=spinning, arena=arena, prepack=prepack)
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    return _session(source, so)


# ------------------------------------------------------------------------------ sessions over shared weights

_VALUES: dict[int, tuple[np.ndarray, ort.OrtValue]] = {}


def _external_value(t: onnx.TensorProto) -> ort.OrtValue:
    """An OrtValue over external tensor ``t``'s shared memory map (``weights.external_array``), made once per
    mapping: no copy of the bytes."""
    arr = external_array(t)  # the same array object for the same tensor bytes, for the life of the process
    if id(arr) not in _VALUES:
        _VALUES[id(arr)] = (arr, ort.OrtValue.ortvalue_from_numpy(np.asarray(arr)))
    return _VALUES[id(arr)][1]


def _external_session(model: onnx.ModelProto, threads: int | None, spinning: bool = True,
                      arena: bool | str = True) -> ort.InferenceSession:
    with tempfile.TemporaryDirectory(prefix="onnx-consensus-") as d:
        return _session_over_values(model, lambda t: _external_value(t) if is_external(t) else None, d,
                                    threads=threads, spinning=spinning, arena=arena)


def _session_over_values(model: onnx.ModelProto, value_of: Callable[[onnx.TensorProto], "ort.OrtValue | None"],
                         folder: str, *, threads: int | None, spinning: bool = True,
                         arena: bool | str = True) -> ort.InferenceSession:
    """A session whose initializers come from ``value_of(tensor)`` (OrtValues given through
    ``add_initializer``, no copy) where it returns one; those tensors are stubbed out of the proto, which is
    saved in ``folder`` and loaded from there. Other external tensors (node attributes, subgraph
    initializers, which ``add_initializer`` cannot supply) are read inline into the session's copy. Graph
    optimisation off and no prepacking: both would make per-session copies of the weights."""
    so = session_options("disable", threads, spinning=spinning, arena=arena, prepack=False)
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    for t in stripped.graph.initializer:
        value = value_of(t)
        if value is None:
            continue  # stays inline
        make_stub(t)
        so.add_initializer(t.name, value)
    for t in all_tensors(stripped):
        if is_external(t) and not any(e.key == "location" and e.value == STUB_LOCATION for e in t.external_data):
            inline_external(t)
    stub = os.path.join(folder, STUB_LOCATION)
    if not os.path.exists(stub):
        open(stub, "wb").close()
    fd, path = tempfile.mkstemp(suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        onnx.save_model(stripped, path)
        return _session(path, so)
    finally:
        os.remove(path)


SHARE_WEIGHTS_BYTES = 256 * 2**20  # models with more initializer bytes than this share them across sessions


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
        self._values = {t.name: _external_value(t) if is_external(t) else
                        ort.OrtValue.ortvalue_from_numpy(numpy_helper.to_array(t)) for t in model.graph.initializer}
        self._dir = tempfile.TemporaryDirectory(prefix="onnx-consensus-")

    def __enter__(self) -> "SharedWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._dir.cleanup()

    def session(self, model: onnx.ModelProto, *, threads: int | None = None, arena: bool = True,
                **_) -> ort.InferenceSession:
        """A session for ``model`` (whose initializers are, by name, those of the shared model; others stay
        inline)."""
        return _session_over_values(model, lambda t: self._values.get(t.name), self._dir.name, threads=threads,
                                    arena=arena)
