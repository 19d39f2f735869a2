"""What the staged criterion (``llm.staged``) holds between rounds for a candidate's cut: each residual-stream
value once, and no tensor that a held one determines (issue 25: at 1.0B the held hidden states outweighed the
int4 weights).

In the fused form the cut of a candidate layer is the pair the opening skip-norm of the next layer sums (the
stream before the previous layer's MLP branch and that branch's output: ``SkipSimplifiedLayerNormalization(input,
skip, gamma)``), and the sum (its output 3) is the layer boundary the scorer holds anyway. A bias-free float32
skip-norm computes every output from ``input + skip`` alone, so fed (sum, 0) it computes bit for bit what it
computes fed (input, skip): ``x + 0 == x`` in IEEE arithmetic. ``fed_from`` finds such pairs; the scorer then
holds one tensor (the sum) instead of two, and builds the zeros one batch at a time (``held_feed``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .suffix import Suffix

__all__ = ["HeldAs", "fed_from", "held_feed", "held_names"]

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


def held_feed(held: dict[str, list[np.ndarray]], how: dict[str, HeldAs], k: int) -> dict[str, np.ndarray]:
    """Batch ``k``'s cut feeds from ``held`` (name -> per-batch arrays): each held array or zeros like it."""
    return {c: np.zeros_like(held[h.source][k]) if h.zero else held[h.source][k] for c, h in how.items()}
