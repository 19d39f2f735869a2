"""Multiply-accumulate (MAC) and parameter counts of an ONNX model.

Only the dense layers are counted, as in the paper ("FLOPs" there are multiply-accumulates of the
convolution and fully connected layers):

* ``Conv`` (and ``ConvInteger`` / ``QLinearConv``):
  ``N * C_out * prod(output spatial) * (C_in / group) * prod(kernel)``
* ``ConvTranspose``: ``N * C_in * prod(input spatial) * (C_out / group) * prod(kernel)``
* ``Gemm``: ``M * N * K`` (``transA`` / ``transB`` honoured)
* ``MatMul`` (and ``MatMulInteger`` / ``QLinearMatMul``): ``prod(broadcast batch dims) * M * N * K``
  with numpy broadcasting and numpy's 1-D promotion rules.
* com.microsoft ``MatMulNBits`` / ``QGemm``: ``quant.quantized_macs``.
* ``LSTM`` / ``GRU`` / ``RNN``: ``T * N * (numel(W) + numel(R))``, W (directions, gates * hidden, input) and
  R (directions, gates * hidden, hidden): every gate's input and recurrent products, each step and direction
  (``layout`` honoured; the elementwise gate arithmetic is not counted, as for every other op).

* ``If``: its costlier branch (the branch a constant condition selects, when shapes inside the branches are
  only known once a branch is inlined); ``Loop`` and ``Scan``: one iteration of the body (``ModelCost.notes``).

Every other operator costs 0. Shapes come from ``shapes.infer_shapes`` (ONNX shape inference, then
onnxruntime's symbolic shape inference where a count still lacks a shape) on a *weight-free* copy of the
graph (large floating-point initializers are replaced by typed graph inputs carrying only their
shape), so models larger than 2 GB and models with external data are handled without a second copy
of their weights.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import InputError
from .ir import tensor_spec
from .quant import QUANT_MAC_OPS, model_bytes, quantized_macs, weight_roles
from .shapes import all_graphs, infer_shapes, weight_free_copy
from .dtypes import FLOAT_TYPES
from .weights import numel

__all__ = ["ModelCost", "count_cost", "parse_input_shape"]
log = logging.getLogger("onnx_consensus")

_CONV_OPS = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}  # op -> index of the weight input
MAX_IF_DEPTH = 8  # nesting levels of If inlined by the MAC count's fallback
_MATMUL_OPS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}  # op -> (A, B)
_RECURRENT_OPS = ("LSTM", "GRU", "RNN")


@dataclass
class ModelCost:
    """Cost of one forward pass.

    Attributes:
        macs_per_node: multiply-accumulates of each node of the main graph, keyed by the node's first
            output tensor name; 0 for operators that are not counted, ``None`` when a shape needed
            for the count is unknown (a dynamic dimension that was not fixed).
        total_macs: sum of ``macs_per_node`` (``None`` if any entry is ``None``). Per batch of
            ``batch_size`` samples (per sample with the default ``batch_size=1``).
        params: number of elements (not bytes) of all floating-point initializers plus floating-point
            ``Constant`` node values with more than one element; quantized weights by their values.
        weight_bytes: bytes of the main graph's initializers as stored (int8: 1 per value, int4: 1/2).
        notes: how control-flow nodes were counted (``If``: the costlier branch; ``Loop``/``Scan``: one
            iteration of the body), when the model has any with MACs.
    """

    macs_per_node: dict[str, int | None] = field(default_factory=dict)
    total_macs: int | None = 0
    params: int = 0
    notes: list[str] = field(default_factory=list)
    weight_bytes: int = 0


def parse_input_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``"NAME:1x3x224x224"`` into ``("NAME", (1, 3, 224, 224))``.

    The name is everything before the last ``:`` (so ``"input:0:1x3"`` names ``"input:0"``);
    dimensions are positive integers separated by ``x`` or ``,``. Raises InputError if malformed.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise InputError(f"malformed input shape {spec!r}: expected NAME:D1xD2x..., e.g. input:1x3x224x224")
    name, _, dims = spec.rpartition(":")
    name, dims = name.strip(), dims.strip()
    if not name:
        raise InputError(f"malformed input shape {spec!r}: empty input name")
    parts = re.split(r"[x,]", dims) if dims else []
    if not parts or not all(re.fullmatch(r"\d+", p.strip()) for p in parts):
        raise InputError(
            f"malformed input shape {spec!r}: dimensions must be positive integers separated by 'x', "
            "e.g. input:1x3x224x224"
        )
    shape = tuple(int(p) for p in parts)
    if any(d <= 0 for d in shape):
        raise InputError(f"malformed input shape {spec!r}: dimensions must be positive")
    return name, shape


def count_params(model: onnx.ModelProto) -> int:
    """Number of elements of all float initializers (dense and sparse) and float Constant tensors
    with more than one element, in the main graph and all subgraphs; a quantized weight counts its values
    (an int4 ``MatMulNBits`` weight N x K), its scales and zero points none (``quant.weight_roles``). Uses
    only ``dims``, so it works on models loaded without their external data."""
    total = 0
    for graph in _all_graphs(model.graph):
        roles = weight_roles(graph.node, {t.name: t for t in graph.initializer})
        for init in graph.initializer:
            if init.name in roles:  # a quantized weight (its values) or a scale / zero point (none)
                total += roles[init.name] or 0
            elif init.data_type in FLOAT_TYPES:
                total += numel(init.dims)
        for sp in graph.sparse_initializer:
            if sp.values.data_type in FLOAT_TYPES:
                total += numel(sp.values.dims)
        for node in graph.node:
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in FLOAT_TYPES:
                    n = numel(attr.t.dims)
                elif attr.name == "sparse_value" and attr.sparse_tensor.values.data_type in FLOAT_TYPES:
                    n = numel(attr.sparse_tensor.dims)
                elif attr.name == "value_floats":
                    n = len(attr.floats)
                else:
                    continue
                if n > 1:
                    total += n
    return total


_all_graphs = all_graphs
_weight_free_copy = weight_free_copy  # the copy shape inference runs on (``shapes.weight_free_copy``)


def _value_info_shapes(infos) -> list[tuple[int | None, ...] | None]:
    """Each ValueInfo's shape with symbolic dims as None (None: no shape declared)."""
    out = []
    for vi in infos:
        shape = tensor_spec(vi).shape
        out.append(None if shape is None else tuple(d if isinstance(d, int) else None for d in shape))
    return out


def _static(shapes) -> dict[str, tuple[int | None, ...] | None]:
    """Shapes with symbolic dims as None."""
    return {k: (None if v is None else tuple(d if isinstance(d, int) else None for d in v))
            for k, v in shapes.items()}


def _known(shape) -> bool:
    return shape is not None and all(d is not None for d in shape)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _input_shape(node, idx, shapes):
    if idx >= len(node.input) or not node.input[idx]:
        return None
    return shapes.get(node.input[idx])


def _node_macs(node: onnx.NodeProto, shapes, found: dict[str, int] | None = None) -> int | None:
    if node.domain == "com.microsoft" and node.op_type in QUANT_MAC_OPS:
        return quantized_macs(node, shapes)
    op = node.op_type if node.domain in ("", "ai.onnx") else None
    if op in ("If", "Loop", "Scan"):
        return _control_flow_macs(node, shapes, {} if found is None else found)
    if op in _CONV_OPS:
        w = _input_shape(node, _CONV_OPS[op], shapes)
        out = shapes.get(node.output[0]) if node.output else None
        if not (_known(w) and _known(out)):
            return None
        # out: (N, C_out, *spatial); w: (C_out, C_in/group, *kernel)
        return numel(out) * numel(w[1:])
    if op == "ConvTranspose":
        x = _input_shape(node, 0, shapes)
        w = _input_shape(node, 1, shapes)
        if not (_known(w) and _known(x)):
            return None
        # x: (N, C_in, *spatial); w: (C_in, C_out/group, *kernel)
        return numel(x) * numel(w[1:])
    if op == "Gemm":
        a = _input_shape(node, 0, shapes)
        b = _input_shape(node, 1, shapes)
        if not (_known(a) and _known(b)) or len(a) != 2 or len(b) != 2:
            return None
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return int(m) * int(n) * int(k)
    if op in _MATMUL_OPS:
        ia, ib = _MATMUL_OPS[op]
        a = _input_shape(node, ia, shapes)
        b = _input_shape(node, ib, shapes)
        if not (_known(a) and _known(b)) or len(a) == 0 or len(b) == 0:
            return None
        k = a[-1]
        m = a[-2] if len(a) >= 2 else 1
        n = b[-1] if len(b) >= 2 else 1
        try:
            batch = np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))
        except ValueError:
            return None
        return numel(batch) * int(m) * int(n) * int(k)
    if op in _RECURRENT_OPS:
        return _recurrent_macs(node, shapes)
    return 0


def _recurrent_macs(node: onnx.NodeProto, shapes) -> int | None:
    """LSTM / GRU / RNN: X (T, N, input) (layout 0) or (N, T, input) (layout 1); T * N * (numel(W) + numel(R))."""
    x, w, r = (_input_shape(node, i, shapes) for i in (0, 1, 2))
    if not (_known(x) and _known(w) and _known(r)) or len(x) != 3:
        return None
    steps, batch = (x[1], x[0]) if _attr(node, "layout", 0) else (x[0], x[1])
    return int(steps) * int(batch) * (numel(w) + numel(r))


def _graph_macs(graph: onnx.GraphProto, shapes, found: dict[str, int], key=None) -> int | None:
    """MACs of ``graph``'s nodes (None if any is unknown); with ``key``, each node's MACs are stored in
    ``key`` as well. found counts the control-flow nodes met: {"If": n, "Loop": n, "Scan": n}."""
    total: int | None = 0
    for node in graph.node:
        value = _node_macs(node, shapes, found)
        if key is not None:
            key[node.output[0] if node.output else node.name] = value
        total = None if value is None or total is None else total + value
    return total


def _control_flow_macs(node: onnx.NodeProto, shapes, found: dict[str, int]) -> int | None:
    """If: the costlier branch (an upper bound on what one run executes). Loop, Scan: one iteration of the
    body (the trip count is data-dependent in general). None when a branch or body has unknown MACs."""
    bodies = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
    costs = [_graph_macs(g, shapes, found) for g in bodies]
    if not costs:
        return 0
    if any(c is None for c in costs):
        return None
    if any(c > 0 for c in costs):
        found[node.op_type] = found.get(node.op_type, 0) + 1
    return max(costs)


def _notes(found: dict[str, int]) -> list[str]:
    notes = []
    if found.get("If"):
        notes.append(f"MACs of {found['If']} If node(s) count the costlier branch")
    for op in ("Loop", "Scan"):
        if found.get(op):
            notes.append(f"MACs of {found[op]} {op} node(s) count one iteration of the body")
    return notes


def count_cost(
    model: onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    batch_size: int = 1,
) -> ModelCost:
    """Count MACs and parameters of ``model``.

    Shapes come from ``shapes.infer_shapes``: ONNX shape inference, then onnxruntime's symbolic shape
    inference when a count still lacks a shape. Control-flow nodes are counted from their subgraphs: an
    ``If`` as its costlier branch, a ``Loop`` or ``Scan`` as one iteration of its body (``ModelCost.notes``
    says when either happened).

    Args:
        model: the model (not modified; external data need not be loaded).
        input_shapes: full shapes for graph inputs whose non-batch dims are dynamic,
            e.g. ``{"input_ids": (1, 128)}``; these override ``batch_size`` for that input. A dim the
            model writes as ``-1`` is dynamic like a symbolic one.
        batch_size: value given to a dynamic leading (batch) dim of every other graph input.

    Returns:
        ModelCost with MACs for one batch of ``batch_size`` samples (integers, multiply-accumulates)
        and the parameter count (elements).
    """
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")

    def enough(_, shapes) -> bool:
        return _graph_macs(model.graph, _static(shapes), {}) is not None

    inferred = infer_shapes(model, dict(input_shapes or {}), int(batch_size), enough=enough)
    shapes = _static(inferred.shapes)
    macs: dict[str, int | None] = {}
    found: dict[str, int] = {}
    total = _graph_macs(model.graph, shapes, found, key=macs)
    notes = _notes(found)
    if total is None and any(n.op_type == "If" for n in model.graph.node):
        total, macs, notes = _cost_of_inlined_ifs(model, input_shapes, batch_size, macs, notes)
    return ModelCost(macs_per_node=macs, total_macs=total, params=count_params(model), notes=notes,
                     weight_bytes=model_bytes(model))


_FOLD_OPS = {
    "Equal": np.equal, "Greater": np.greater, "Less": np.less, "GreaterOrEqual": np.greater_equal,
    "LessOrEqual": np.less_equal, "And": np.logical_and, "Or": np.logical_or, "Add": np.add, "Sub": np.subtract,
    "Mul": np.multiply,
}


def _fold(model: onnx.ModelProto, name: str, shapes, producers, depth: int = 0):
    """The value of tensor ``name`` when it follows from constants and static shapes alone (Shape, Size,
    Gather, Squeeze/Unsqueeze/Reshape, Cast, Not, comparisons, Concat, a few arithmetic ops), else None.
    Enough for the conditions exporters write around a batch or length of 1."""
    from onnx import numpy_helper

    if depth > 32 or not name:
        return None
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    node = producers.get(name)
    if node is None:
        return None
    op = node.op_type
    if op == "Constant":
        a = next((a for a in node.attribute if a.name == "value"), None)
        return numpy_helper.to_array(a.t) if a is not None else None
    if op in ("Shape", "Size"):
        shape = shapes.get(node.input[0])
        if not _known(shape):
            return None
        if op == "Size":
            return np.array(numel(shape), np.int64)
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        return np.array(shape, np.int64)[start:end]
    ins = [_fold(model, i, shapes, producers, depth + 1) if i else None for i in node.input]
    if op not in ("Squeeze", "Unsqueeze") and any(v is None for v in ins[:2 if op == "Gather" else len(ins)]):
        return None
    try:
        if op in _FOLD_OPS:
            return _FOLD_OPS[op](ins[0], ins[1])
        if op == "Not":
            return np.logical_not(ins[0])
        if op == "Cast":
            return ins[0].astype(onnx.helper.tensor_dtype_to_np_dtype(_attr(node, "to", 1)))
        if op == "Gather":
            return np.take(ins[0], ins[1], axis=_attr(node, "axis", 0))
        if op in ("Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"):
            if ins[0] is None:
                return None
            if op == "Identity":
                return ins[0]
            if op == "Reshape":
                return ins[0].reshape(ins[1])
            if op == "Squeeze":
                return np.squeeze(ins[0]) if ins[0].size == 1 else None
            return ins[0].reshape(-1) if ins[0].size == 1 else None
        if op == "Concat":
            return np.concatenate([np.atleast_1d(v) for v in ins], axis=_attr(node, "axis", 0))
    except (ValueError, TypeError, IndexError):
        return None
    return None


def _inline_ifs(model: onnx.ModelProto, branch: str, input_shapes, batch_size: int) -> tuple[onnx.ModelProto, bool]:
    """A copy of ``model`` whose If nodes (nested ones too) are replaced by the nodes of one branch each: the
    branch the condition selects when it follows from constants and the shapes (``_fold``; shapes inferred
    again after each level), else ``branch`` ("then_branch" / "else_branch"). The branch outputs are renamed
    to the If's outputs by Identity nodes; inner names are unique across scopes (as exporters write them),
    so outer-scope reads need no renaming. Returns (the copy, whether every condition was decided)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    decided = True
    for _ in range(MAX_IF_DEPTH):  # an If inside a branch becomes a main-graph If once its branch is inlined
        if not any(n.op_type == "If" for n in out.graph.node):
            break
        shapes = _static(infer_shapes(out, dict(input_shapes or {}), batch_size).shapes)
        producers = {o: n for n in out.graph.node for o in n.output}
        nodes = []
        for node in out.graph.node:
            if node.op_type != "If":
                nodes.append(node)
                continue
            cond = _fold(out, node.input[0], shapes, producers)
            if cond is None or np.size(cond) != 1:
                decided = False
                pick = branch
            else:
                pick = "then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch"
            body = next(a.g for a in node.attribute if a.name == pick)
            nodes.extend(body.node)
            out.graph.initializer.extend(body.initializer)
            nodes.extend(onnx.helper.make_node("Identity", [o.name], [name], name=f"{name}__inlined")
                         for o, name in zip(body.output, node.output))
        del out.graph.node[:]
        out.graph.node.extend(nodes)
    return out, decided


def _cost_of_inlined_ifs(model, input_shapes, batch_size, macs, notes):
    """MACs when shapes inside the If branches stay unknown in the model as it is (inference does not bind a
    branch's tensors to the outer inputs' sizes): the If nodes inlined (``_inline_ifs``), counted as a plain
    graph; when a condition depends on input values, both choices are counted and the costlier kept. Returns
    (total, per-node MACs of the original main graph, notes); the input unchanged when inlining does not help."""
    variants, decided, unknown = {}, True, []
    for branch in ("then_branch", "else_branch"):
        try:
            flat, known = _inline_ifs(model, branch, input_shapes, batch_size)
            cost = count_cost(flat, input_shapes, batch_size)
        except Exception as exc:  # noqa: BLE001 - a fallback: any failure leaves that variant uncounted
            log.debug("MACs with If branches inlined (%s): %s", branch, exc)
            cost, known = None, False
        decided = decided and known
        if cost is None or cost.total_macs is None:
            unknown.append(branch)
        else:
            variants[branch] = cost
        if known:
            break  # every condition followed from the shapes: there is one variant
    if not variants:
        return None, macs, notes
    branch = max(variants, key=lambda b: variants[b].total_macs)
    chosen = variants[branch]
    per_node = dict(macs)
    inner = sum(v or 0 for k, v in chosen.macs_per_node.items() if k not in macs)
    for node in model.graph.node:
        key = node.output[0] if node.output else node.name
        if per_node.get(key) is None and node.op_type != "If":
            per_node[key] = chosen.macs_per_node.get(key)
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    for node in ifs:  # the inlined branches' MACs, on the (first) If that held them
        per_node[node.output[0]] = inner if node is ifs[0] else 0
    count = len(ifs)
    if decided:
        why = f"MACs of {count} If node(s) count the branch their condition selects at these shapes"
    elif unknown:
        why = (f"MACs of {count} If node(s) count the {branch.replace('_', ' ')} where the condition depends on "
               f"input values: the other branch's MACs are unknown at these shapes")
    else:
        other = variants["else_branch" if branch == "then_branch" else "then_branch"].total_macs
        why = (f"MACs of {count} If node(s) count the costlier branch where the condition depends on input "
               f"values ({branch.replace('_', ' ')}: {chosen.total_macs:,} MACs, the other {other:,})")
    return chosen.total_macs, per_node, [n for n in notes if not n.startswith("MACs of")] + [why]
