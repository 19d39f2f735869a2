"""What a model's outputs are, and which tensor the global scope compares (the feature tensor).

- ``output_kinds``: each float graph output's kind (the registry of recognisers in ``kinds``: detector heads,
  DB text maps, class scores, embeddings, generic values), which decides how fidelity is measured;
- ``choose_feature``: the classifier's input when the graph ends in a classifier head after the last
  candidate block, otherwise the graph's float outputs (pooled by ``pool_output``).

The graph tests the ``kinds`` recognisers share. How an output is judged class scores: walking back from the
output through shape-only ops (Reshape, Flatten, Squeeze, Unsqueeze, Transpose, Identity, Cast), a bias or
scale by a constant (Add/Sub/Mul/Div with one constant operand) and Softmax/LogSoftmax, the walk reaches a
Softmax/LogSoftmax or a Gemm/MatMul/Conv with a constant weight; and the output has rank 2 (N, classes) or 3
(a sequence of class scores, e.g. CTC) with a last axis of at least 2 when known. A softmax written out by
the exporter counts as Softmax (``_decomposed_softmax``): tf2onnx / jax2tf write ``Exp(z) / ReduceSum(Exp(z))``
(magika), ``Exp(z) * Reciprocal(ReduceSum(Exp(z)))`` is the same, and log-softmax as ``z - Log(ReduceSum(Exp(z)))``
or ``z - ReduceLogSumExp(z)``; z may be ``x - ReduceMax(x)`` (the stabilising shift, possibly clamped by a
constant Max as jax writes it), and the sum may be reshaped or broadcast (Reshape, Unsqueeze, Expand) back.
Regressions made by a weighted layer without a softmax (boxes, landmarks) are not class scores
(``kinds.basic``). Any other rank-2 float output with more than one column is an "embedding" (e.g. MiniLM's
L2-normalised mean-pooled sentence vector, made by a Div of two data tensors); the rest are "generic".

When the graph "ends in a classifier head": the first output is class scores, the walk back from it
reached a weighted node H (the head), H dominates the output (every data path from a graph input to the
output goes through H; paths through Shape/Size, which carry no values, do not count), and H's data input
is downstream of every candidate block's exit. Then the feature is H's data input, as the published method
uses. In a post-LN encoder the last weighted node is inside the last layer's MLP, and the skip path goes
around it: its input is no feature (removing the last MLP would score ~0 there).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import InputError
from ..kinds.registry import TASKS
from .ir import GraphIndex, to_gs

CLASS_SCORES = "class scores"
HEAD_OPS = ("Gemm", "MatMul", "Conv")
SCORE_OPS = ("Softmax", "LogSoftmax")
SHAPE_ONLY_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast")
AFFINE_OPS = ("Add", "Sub", "Mul", "Div")
NO_VALUE_OPS = ("Shape", "Size")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
GRID_MIN_DIM = 16


@dataclass(frozen=True)
class FeatureChoice:
    """The global scope's feature: ``tensors`` (one, or the graph's float outputs), ``reason`` in words,
    ``head`` True when it is a classifier head's input."""

    tensors: tuple[str, ...]
    reason: str
    head: bool = False

    @property
    def name(self) -> str:
        return ",".join(self.tensors)

    def to_json(self) -> dict:
        return {"tensors": list(self.tensors), "reason": self.reason, "classifier_input": self.head}


def _check_task(task: str | None) -> None:
    if task is not None and task not in TASKS:
        raise InputError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")


def float_output_tensors(graph: gs.Graph, index: GraphIndex) -> list[gs.Tensor]:
    """Graph outputs of a float type that depend on an input (dtype unknown counts as float)."""
    return [t for t in graph.outputs if is_float_type(getattr(t, "dtype", None)) and index.is_data(t)]


def is_float_type(dtype) -> bool:
    if dtype is None:
        return True
    if isinstance(dtype, int):
        return dtype in FLOAT_TYPES
    if getattr(dtype, "name", str(dtype)) == "bfloat16":
        return True
    try:
        return bool(np.issubdtype(np.dtype(dtype), np.floating))
    except TypeError:
        return False


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
        elif node.op in SHAPE_ONLY_OPS:
            name = node.inputs[0].name
        elif node.op in AFFINE_OPS:
            data = [t for t in node.inputs if index.is_data(t)]
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


def _kinds(graph: gs.Graph, index: GraphIndex, task: str | None, overrides: Sequence[str] = ()) -> dict[str, str]:
    from ..kinds.registry import kinds_of, recognise

    return kinds_of(recognise(graph, index, float_output_tensors(graph, index), task=task, overrides=overrides))


def output_kinds(model: onnx.ModelProto, task: str | None = None, overrides: Sequence[str] = ()) -> dict[str, str]:
    """{output name: kind} for the model's float outputs, in graph order (the kinds of ``kinds.registry``:
    "class scores", "embedding", "generic", "yolov8", "yolov5", "yolov10", "boxes", "scores", "text map",
    "ctc"). ``task`` (``kinds.registry.TASKS``) and ``overrides`` (--output-kind NAME=KIND[:ARGS]) as in
    ``kinds.registry.recognise``."""
    _check_task(task)
    graph = to_gs(model)
    return _kinds(graph, GraphIndex(graph), task, overrides)


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


def score_forms(model: onnx.ModelProto, kinds: dict[str, str] | None = None) -> dict[str, str]:
    """{output name: "probabilities" | "log-probabilities" | "logits"} for the class-score outputs of
    ``kinds`` (default ``output_kinds(model)``): what a distillation loss must undo before tempering."""
    graph = to_gs(model)
    index = GraphIndex(graph)
    kinds = _kinds(graph, index, None) if kinds is None else kinds
    return {name: score_form(index, name) for name, kind in kinds.items() if kind == CLASS_SCORES}


def _dominates(index: GraphIndex, node: gs.Node, target: str) -> bool:
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
                if t.name not in reached:
                    reached.add(t.name)
                    stack.append(t.name)
    return True


def choose_feature(model: onnx.ModelProto, blocks: Sequence = (), *, task: str | None = None,
                   feature: str | None = None, kinds: dict[str, str] | None = None) -> FeatureChoice:
    """The feature tensor(s) for the global scope, with the reason (see the module docstring).

    blocks: the candidate blocks (their ``exit``), which the feature must be downstream of. task:
    "classify" keeps the input of the last Gemm/MatMul/Conv upstream of the first output (the tool's
    behaviour before the head test); "embed"/"generic" take the graph's float outputs. feature: a tensor
    the user named (taken as is). kinds: the outputs' kinds when already known (the output plan's, with the
    user's --output-kind), else recognised here."""
    _check_task(task)
    if feature:
        return FeatureChoice((feature,), "named with --feature")
    if task == "classify":
        from .instrument import find_feature_tensor

        return FeatureChoice((find_feature_tensor(model),), "--task classify: input of the last Gemm/MatMul/Conv",
                             True)
    graph = to_gs(model)
    index = GraphIndex(graph)
    kinds = _kinds(graph, index, task) if kinds is None else kinds
    if not kinds:
        raise InputError("the model has no float output to compare; name a feature tensor with --feature")
    first = next(iter(kinds))
    outputs = tuple(kinds)
    what = "graph outputs" if len(outputs) > 1 else "graph output"
    if task is not None:
        return FeatureChoice(outputs, f"{what}, as --task {task} says")
    if kinds[first] != CLASS_SCORES:
        return FeatureChoice(outputs, f"{what}; no classifier head: {first} is not class scores ({kinds[first]})")
    _, head = walk_back(index, first)
    if head is None:
        return FeatureChoice(outputs, f"{what}; no classifier head: no weighted layer makes the class scores {first}")
    x = next(t.name for t in head.inputs if index.is_data(t))
    if not _dominates(index, head, first):
        return FeatureChoice(outputs, f"{what}; {head.op} {head.name} is no classifier head: a skip path goes "
                                      f"around it to {first}")
    upstream, _ = index.ancestors(x)
    missed = [b.exit for b in blocks if b.exit not in upstream]
    if missed:
        return FeatureChoice(outputs, f"{what}; the classifier head's input {x} is not downstream of block "
                                      f"{missed[0]}")
    return FeatureChoice((x,), f"input of the classifier head {head.op} {head.name}, which makes the class "
                               f"scores {first}", True)


def pool_output(a: np.ndarray, mask: np.ndarray | None = None, *, min_dim: int = GRID_MIN_DIM) -> np.ndarray:
    """Pool a graph output (a feature of the global scope) to (N, d) float64.

    As ``metrics.features.pool_features`` (tokens averaged over the kept tokens, spatial axes averaged),
    except that a map (N, C, d1, d2, ...) with C < ``min_dim`` channels is averaged over a grid of cells
    rather than whole: a one-channel detection map averaged to one number per sample says nothing of where
    its mass is. g cells per spatial axis, g the smallest with C * g**k >= min_dim (k spatial axes); cell i
    of an axis of size S spans [floor(i*S/g), ceil((i+1)*S/g)) as in adaptive average pooling, never
    empty, so inputs of different sizes give the same d = C * g**k."""
    from ..metrics.features import pool_features

    a = np.asarray(a)
    if a.ndim < 4 or a.shape[1] >= min_dim:
        return pool_features(a, mask)
    k = a.ndim - 2
    g = 1
    while a.shape[1] * g ** k < min_dim:
        g += 1
    cells = [a]
    for axis in range(2, a.ndim):
        size = a.shape[axis]
        spans = [(i * size // g, max(i * size // g + 1, -(-(i + 1) * size // g))) for i in range(g)]
        cells = [np.take(c, range(lo, hi), axis=axis) for c in cells for lo, hi in spans]
    pooled = [c.mean(axis=tuple(range(2, a.ndim)), dtype=np.float64) for c in cells]  # each (N, C)
    return np.concatenate(pooled, axis=1)
