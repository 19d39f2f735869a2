"""What the staged criterion (``llm.staged``) holds between rounds for a candidate's cut: each residual-stream
value once, and no tensor that a held one determines (issue 25: at 1.0B the held hidden states outweighed the
int4 weights).

In the fused form the cut of a candidate layer is the pair the opening skip-norm of the next layer sums (the
stream before the previous layer's MLP branch and that branch's output: ``SkipSimplifiedLayerNormalization(input,
skip, gamma)``), and the sum (its output 3) is the layer boundary the scorer holds anyway. A bias-free float32
skip-norm computes every output from ``input + skip`` alone, so fed (sum, 0) it computes bit for bit what it
computes fed (input, skip): ``x + 0 == x`` in IEEE arithmetic. ``fed_from`` finds such pairs; the scorer then
holds one tensor (the sum) instead of two, and builds the zeros one batch at a time (``held_feed``).

Where the held values live: a ``HeldStore``, an unlinked temporary file that each batch's value is written to as a
run produces it and read back from when a round needs it, so the scorer's memory is bounded by one batch, not by
the calibration set ((layers + 1) x windows x seq x hidden floats: 0.6 GB at 1.0B parameters for 13 windows of
128 tokens, as much as the int4 weights, and 16x that for 200 windows). The operating system's page cache keeps
recently written values in memory while there is room, so reading them back costs a copy, not a disk read.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import InputError
from .suffix import Suffix

__all__ = ["HeldAs", "HeldStore", "Stored", "fed_from", "held_feed", "held_names"]

BIAS_INPUT = {"SkipSimplifiedLayerNormalization": 3, "SkipLayerNormalization": 4}
"""The skip-norms (``graph.decoder.SKIP_NORMS``) by the index of their optional bias input (the sum is output 3
in both)."""


@dataclass(frozen=True)
class HeldAs:
    """How one cut tensor is fed: from the held tensor ``source``, its values (``zero`` False) or zeros of its
    shape and dtype (``zero`` True)."""

    source: str
    zero: bool = False


def _summing(node: onnx.NodeProto, float32: set[str]) -> bool:
    """Whether ``node`` is a bias-free skip-norm with a float32 scale (its outputs depend on input + skip only)."""
    if node.op_type not in BIAS_INPUT or len(node.input) < 3:
        return False
    bias = BIAS_INPUT[node.op_type]
    return node.input[2] in float32 and (len(node.input) <= bias or not node.input[bias])


def fed_from(current: onnx.ModelProto, suffix: Suffix) -> dict[str, HeldAs]:
    """cut name -> the held tensor it is fed from (module docstring). ``current``: the current model (weightless
    is enough: its graph and initializer types), which computes the suffix's cut. A pair (a, b) of cut tensors is
    fed as (s, zeros) when every suffix node reading a or b is a bias-free float32 skip-norm reading exactly (a, b)
    as its first two inputs, and the current model has such a node of the same two inputs naming its sum s
    (output 3); every other cut tensor is fed from itself."""
    float32 = {t.name for t in current.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    sums = {tuple(n.input[:2]): n.output[3] for n in current.graph.node
            if _summing(n, float32) and len(n.output) > 3 and n.output[3]}
    cut = set(suffix.cut)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in suffix.model.graph.node:
        for x in n.input:
            if x in cut:
                readers.setdefault(x, []).append(n)
    how = {c: HeldAs(c) for c in suffix.cut}
    for pair, s in sums.items():
        if not set(pair) <= cut or pair[0] == pair[1]:
            continue
        nodes = readers[pair[0]] + readers[pair[1]]
        if all(_summing(n, float32) and tuple(n.input[:2]) == pair and not set(n.input[2:]) & set(pair)
               for n in nodes):
            how[pair[0]], how[pair[1]] = HeldAs(s), HeldAs(s, zero=True)
    return how


def held_names(how: dict[str, HeldAs]) -> set[str]:
    """The tensors a run of the current model must keep for these feeds."""
    return {h.source for h in how.values()}


@dataclass(frozen=True)
class Stored:
    """One array in a ``HeldStore``: its byte offset in the store's file, shape and dtype."""

    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class HeldStore:
    """Arrays written to an unlinked temporary file (gone when closed or when the process ends) and read back
    on demand: ``put`` returns a ``Stored`` handle, ``get`` a fresh array. Append-only: a value replaced between
    rounds leaves its bytes behind (a round writes the few boundaries downstream of one candidate's layer)."""

    def __init__(self, folder: str | None = None):
        self.folder = folder or tempfile.gettempdir()
        self._file = tempfile.TemporaryFile(prefix="onnx-consensus-held-", dir=self.folder)
        self._end = 0

    def put(self, array: np.ndarray) -> Stored:
        a = np.asarray(array)
        a = a if a.flags.c_contiguous else a.copy(order="C")  # (not ascontiguousarray: it makes a 0-d array 1-d)
        handle = Stored(self._end, tuple(a.shape), a.dtype)
        view = memoryview(a.reshape(-1).view(np.uint8)) if a.size else memoryview(b"")
        done = 0
        while done < len(view):
            done += os.pwrite(self._file.fileno(), view[done:], self._end + done)
        self._end += handle.nbytes
        return handle

    def check_room(self, nbytes: int) -> None:
        """InputError (one line) when the store's folder has less than ``nbytes`` free, before a run fills it."""
        free = shutil.disk_usage(self.folder).free
        if free < nbytes:
            raise InputError(f"the staged criterion keeps {nbytes / 1e9:.1f} GB of hidden states in a temporary "
                             f"file in {self.folder}, which has {free / 1e9:.1f} GB free: point TMPDIR at a larger "
                             f"disk or lower --max-samples")

    def get(self, handle: Stored) -> np.ndarray:
        out = np.empty(handle.shape, handle.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(bytearray())
        done = 0
        while done < len(view):
            got = os.preadv(self._file.fileno(), [view[done:]], handle.offset + done)
            if got <= 0:
                raise OSError(f"held values: short read at byte {handle.offset + done} of the temporary file")
            done += got
        return out

    def close(self) -> None:
        self._file.close()


def held_feed(held: dict[str, list[Stored]], how: dict[str, HeldAs], k: int,
              store: HeldStore) -> dict[str, np.ndarray]:
    """Batch ``k``'s cut feeds from ``held`` (name -> per-batch handles in ``store``): each held array (read
    once per source) or zeros like it."""
    read = {h.source: store.get(held[h.source][k]) for h in how.values()}
    return {c: np.zeros_like(read[h.source]) if h.zero else read[h.source] for c, h in how.items()}
