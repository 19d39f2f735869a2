"""The graph tests that output kinds and the feature choice share (``kinds``, ``kinds.outputs``): what makes an
output class scores, a classifier head, a softmax written out by an exporter.

How an output is judged class scores: walking back from the output through shape-only ops (Reshape, Flatten,
Squeeze, Unsqueeze, Transpose, Identity, Cast), a bias or scale by a constant (Add/Sub/Mul/Div with one constant
operand) and Softmax/LogSoftmax, the walk reaches a Softmax/LogSoftmax or a Gemm/MatMul/Conv with a constant
weight; and the output has rank 2 (N, classes) or 3 (a sequence of class scores, e.g. CTC) with a last axis of at
least 2 when known. A softmax written out by the exporter counts as Softmax (``_decomposed_softmax``): tf2onnx /
jax2tf write ``Exp(z) / ReduceSum(Exp(z))`` (magika), ``Exp(z) * Reciprocal(ReduceSum(Exp(z)))`` is the same, and
log-softmax as ``z - Log(ReduceSum(Exp(z)))`` or ``z - ReduceLogSumExp(z)``; z may be ``x - ReduceMax(x)`` (the
stabilising shift, possibly clamped by a constant Max as jax writes it), and the sum may be reshaped or broadcast
(Reshape, Unsqueeze, Expand) back. Regressions made by a weighted layer without a softmax (boxes, landmarks) are
not class scores (``kinds.basic``). Any other rank-2 float output with more than one column is an "embedding" (e.g.
MiniLM's L2-normalised mean-pooled sentence vector, made by a Div of two data tensors); the rest are "generic".
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .dtypes import is_float_type
from .ir import GraphIndex
from .quant import QDQ_OPS, QUANT_HEAD_OPS, is_runtime_scale

HEAD_OPS = ("Gemm", "MatMul", "Conv") + QUANT_HEAD_OPS
SCORE_OPS = ("Softmax", "LogSoftmax")
SHAPE_ONLY_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast")
AFFINE_OPS = ("Add", "Sub", "Mul", "Div")
NO_VALUE_OPS = ("Shape", "Size")


def float_output_tensors(graph: gs.Graph, index: GraphIndex) -> list[gs.Tensor]:
    """Graph outputs of a float type that depend on an input (dtype unknown counts as float)."""
    return [t for t in graph.outputs if is_float_type(getattr(t, "dtype", None)) and index.is_data(t)]


def _constant(index: GraphIndex, t: gs.Tensor) -> bool:
    return not index.is_data(t) and (isinstance(t, gs.Constant) or bool(t.name))


def _weighted(index: GraphIndex, node: gs.Node) -> bool:
    """A Gemm/MatMul/Conv with one data input and a constant operand (its learned weight)."""
    ins = [t for t in node.inputs if t.name or isinstance(t, gs.Constant)]
    return (node.op in HEAD_OPS and any(index.is_data(t) for t in ins)
            and any(_constant(index, t) for t in ins[:2]))


BROADCAST_OPS = SHAPE_ONLY_OPS + ("Expand",)


def producer_through(index: GraphIndex, name: str, ops: tuple[str, ...] = BROADCAST_OPS) -> gs.Node | None:
    """The first producer upstream of tensor ``name`` that is not a shape-only / broadcast op (following
    their data input 0); also through Max/Min with a constant operand (jax clamps a row max by -inf).
    None at a graph input or a constant."""
    seen: set[str] = set()
    while name not in seen:
        seen.add(name)
        node = index.producer.get(name)
        if node is None:
            return None
        if node.op in ops and node.inputs:
            name = node.inputs[0].name
        elif node.op in ("Max", "Min") and len(node.inputs) == 2:
            data = [t for t in node.inputs if index.is_data(t)]
            if len(data) != 1:
                return node
            name = data[0].name
        else:
            return node
    return None


def _unshifted(index: GraphIndex, name: str) -> str:
    """``x`` when tensor ``name`` is ``x - ReduceMax(x)`` (the max possibly reshaped, broadcast or clamped by a
    constant), else ``name``: the shift softmax is invariant to."""
    node = index.producer.get(name)
    if node is not None and node.op == "Sub" and len(node.inputs) == 2:
        x, m = node.inputs
        red = producer_through(index, m.name)
        if red is not None and red.op == "ReduceMax" and red.inputs and red.inputs[0].name == x.name:
            return x.name
    return name


def _sum_of_exp(index: GraphIndex, name: str) -> str | None:
    """The summed tensor's name when tensor ``name`` is ReduceSum(e) (possibly reshaped or broadcast back),
    else None; the caller checks that e is the Exp it started from."""
    red = producer_through(index, name)
    if red is None or red.op != "ReduceSum" or not red.inputs:
        return None
    return red.inputs[0].name


def _decomposed_softmax(index: GraphIndex, node: gs.Node) -> str | None:
    """The logits tensor when ``node`` ends a softmax or log-softmax written out in elementwise ops (see the
    module docstring), else None."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if node.op in ("Div", "Mul"):
        exp = index.producer.get(a.name)
        if exp is None or exp.op != "Exp":
            return None
        if node.op == "Mul":  # e * Reciprocal(sum e)
            rec = producer_through(index, b.name)
            if rec is None or rec.op != "Reciprocal":
                return None
            b = rec.inputs[0]
        if _sum_of_exp(index, b.name) == a.name:
            return _unshifted(index, exp.inputs[0].name)
        return None
    if node.op == "Sub":  # z - log(sum(exp(z))) or z - ReduceLogSumExp(z)
        lse = producer_through(index, b.name)
        if lse is None:
            return None
        if lse.op == "ReduceLogSumExp" and lse.inputs and lse.inputs[0].name == a.name:
            return _unshifted(index, a.name)
        if lse.op == "Log":
            e = _sum_of_exp(index, lse.inputs[0].name)
            exp = index.producer.get(e) if e is not None else None
            if exp is not None and exp.op == "Exp" and exp.inputs[0].name == a.name:
                return _unshifted(index, a.name)
    return None


def walk_back(index: GraphIndex, name: str, explicit: bool = False) -> tuple[bool, gs.Node | None]:
    """From tensor ``name`` back through shape-only, constant-affine and Softmax ops: (class-score
    producer reached, the weighted head node reached or None). ``explicit``: the first item says whether a
    Softmax/LogSoftmax (or a written-out one) was passed, not merely whether a weighted node was reached."""
    scores = False
    seen: set[str] = set()
    while name not in seen:
        seen.add(name)
        node = index.producer.get(name)
        if node is None:
            return scores, None
        if node.op in HEAD_OPS:
            return (scores or not explicit, node) if _weighted(index, node) else (scores, None)
        logits = _decomposed_softmax(index, node) if node.op in ("Div", "Mul", "Sub") else None
        if logits is not None:
            scores = True
            name = logits
        elif node.op in SCORE_OPS:
            scores = True
            name = node.inputs[0].name
        elif node.op in SHAPE_ONLY_OPS + QDQ_OPS:
            name = node.inputs[0].name
        elif node.op in AFFINE_OPS:
            data = [t for t in node.inputs if not is_runtime_scale(index, t)]
            if len(data) != 1:
                return scores, None
            name = data[0].name
        else:
            return scores, None
    return scores, None


def class_shape_ok(t: gs.Tensor) -> bool:
    """Rank 2 or 3 (unknown rank passes), last axis >= 2 when static."""
    shape = getattr(t, "shape", None)
    if shape is None:
        return True
    if len(shape) not in (2, 3):
        return False
    last = shape[-1]
    return not (isinstance(last, int) and 0 < last < 2)


def score_form(index: GraphIndex, name: str) -> str:
    """"probabilities" when the last value op before tensor ``name`` (past shape-only ops and a clamp by a
    constant) is a Softmax or a written-out one, "log-probabilities" for a LogSoftmax (or written-out), else
    "logits"."""
    node = producer_through(index, name, SHAPE_ONLY_OPS)
    if node is None:
        return "logits"
    if node.op == "Softmax":
        return "probabilities"
    if node.op == "LogSoftmax":
        return "log-probabilities"
    if _decomposed_softmax(index, node) is not None:
        return "probabilities" if node.op in ("Div", "Mul") else "log-probabilities"
    return "logits"


def dominates(index: GraphIndex, node: gs.Node, target: str) -> bool:
    """True when every value path from a graph input to tensor ``target`` goes through ``node``."""
    stack = [t.name for t in index.graph.inputs]
    seen: set[int] = set()
    reached = set(stack)
    while stack:
        name = stack.pop()
        if name == target:
            return False
        for c in index.consumers(name):
            if c is node or c.op in NO_VALUE_OPS or id(c) in seen:
                continue
            seen.add(id(c))
            for t in c.outputs:
                if t.name not in reached and not is_runtime_scale(index, t):  # a scale carries no values
                    reached.add(t.name)
                    stack.append(t.name)
    return True
