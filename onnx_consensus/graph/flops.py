"""Multiply-accumulate (MAC) and parameter counts of an ONNX model.

Only the dense layers are counted, as in the paper ("FLOPs" there are multiply-accumulates of the
convolution and fully connected layers):

* ``Conv`` (and ``ConvInteger`` / ``QLinearConv``):
  ``N * C_out * prod(output spatial) * (C_in / group) * prod(kernel)``
* ``ConvTranspose``: ``N * C_in * prod(input spatial) * (C_out / group) * prod(kernel)``
* ``Gemm``: ``M * N * K`` (``transA`` / ``transB`` honoured)
* ``MatMul`` (and ``MatMulInteger`` / ``QLinearMatMul``): ``prod(broadcast batch dims) * M * N * K``
  with numpy broadcasting and numpy's 1-D promotion rules.

Every other operator costs 0. Shapes come from ONNX shape inference run on a *weight-free* copy of the
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
from onnx import TensorProto

from ..errors import InputError
from .ir import tensor_spec
from .weights import FLOAT_TYPES, is_weight, numel as _numel

__all__ = ["ModelCost", "count_cost", "parse_input_shape"]

_CONV_OPS = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}  # op -> index of the weight input
_MATMUL_OPS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}  # op -> (A, B)


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
            ``Constant`` node values with more than one element.
    """

    macs_per_node: dict[str, int | None] = field(default_factory=dict)
    total_macs: int | None = 0
    params: int = 0


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
    with more than one element, in the main graph and all subgraphs. Uses only ``dims``, so it works
    on models loaded without their external data."""
    total = 0
    for graph in _all_graphs(model.graph):
        for init in graph.initializer:
            if init.data_type in FLOAT_TYPES:
                total += _numel(init.dims)
        for sp in graph.sparse_initializer:
            if sp.values.data_type in FLOAT_TYPES:
                total += _numel(sp.values.dims)
        for node in graph.node:
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in FLOAT_TYPES:
                    n = _numel(attr.t.dims)
                elif attr.name == "sparse_value" and attr.sparse_tensor.values.data_type in FLOAT_TYPES:
                    n = _numel(attr.sparse_tensor.dims)
                elif attr.name == "value_floats":
                    n = len(attr.floats)
                else:
                    continue
                if n > 1:
                    total += n
    return total


def _all_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_graphs(g)


def _weight_free_copy(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]], batch_size: int
) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference: its weights (``weights.is_weight``, the threshold of
    ``weights.weightless``) become graph inputs with their type and shape only (no values), graph inputs
    get their batch dim / dynamic dims fixed. Inputs rather than ``weightless``'s external-data stubs:
    onnxruntime's symbolic shape inference, the fall-back below, reads initializer values and would try
    to open the stubs' file."""
    src = model.graph
    init_names = {i.name for i in src.initializer}
    g = onnx.GraphProto()
    g.name = src.name
    g.node.extend(src.node)  # Constant values are copied; they are small in practice
    g.output.extend(src.output)
    # value_info is left out: shapes recorded for another batch size would conflict with the fixed
    # inputs. count_cost falls back to it for tensors that inference cannot reach.
    g.sparse_initializer.extend(src.sparse_initializer)

    known_inputs = {i.name for i in src.input if i.name not in init_names}
    unknown = set(input_shapes) - known_inputs
    if unknown:
        raise InputError(
            f"input shape given for {sorted(unknown)!r}, which is not a model input "
            f"(inputs: {sorted(known_inputs)!r})"
        )
    for inp in src.input:
        new = g.input.add()
        new.CopyFrom(inp)
        if inp.name in init_names or not new.type.HasField("tensor_type"):
            continue
        tt = new.type.tensor_type
        if inp.name in input_shapes:
            shape = tuple(int(d) for d in input_shapes[inp.name])
            if tt.HasField("shape") and len(tt.shape.dim) != len(shape):
                raise InputError(
                    f"input shape for {inp.name!r} has rank {len(shape)} but the model input has rank "
                    f"{len(tt.shape.dim)}"
                )
            if not tt.HasField("shape"):
                tt.shape.SetInParent()
                for _ in shape:
                    tt.shape.dim.add()
            for i, (dim, want) in enumerate(zip(tt.shape.dim, shape)):
                if dim.HasField("dim_value") and dim.dim_value != want:
                    raise InputError(
                        f"input shape for {inp.name!r} sets dim {i} to {want} but the model fixes it to "
                        f"{dim.dim_value}"
                    )
                dim.Clear()
                dim.dim_value = want
        elif tt.HasField("shape") and len(tt.shape.dim) > 0:
            dim0 = tt.shape.dim[0]
            if not dim0.HasField("dim_value"):
                dim0.Clear()
                dim0.dim_value = batch_size

    declared = {i.name for i in g.input}
    for init in src.initializer:
        if is_weight(init):
            if init.name in declared:
                continue  # already declared as an input (IR < 4 style); its type is there
            vi = onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            g.input.append(vi)
        elif init.data_location == TensorProto.EXTERNAL:
            # small tensor stored externally and not loaded: keep its type only
            if init.name not in declared:
                g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            g.initializer.append(init)

    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    m.graph.CopyFrom(g)
    return m


def _value_info_shapes(infos) -> list[tuple[int | None, ...] | None]:
    """Each ValueInfo's shape with symbolic dims as None (None: no shape declared)."""
    out = []
    for vi in infos:
        shape = tensor_spec(vi).shape
        out.append(None if shape is None else tuple(d if isinstance(d, int) else None for d in shape))
    return out


def _shape_map(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...] | None]:
    """Tensor name -> shape (None entries for unknown dims) for everything inference annotated."""
    shapes: dict[str, tuple[int | None, ...] | None] = {}
    g = model.graph
    infos = [vi for vi in list(g.input) + list(g.value_info) + list(g.output) if vi.type.HasField("tensor_type")]
    for vi, shape in zip(infos, _value_info_shapes(infos)):
        if shape is not None or vi.name not in shapes:
            shapes[vi.name] = shape
    for init in g.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    return shapes


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


def _node_macs(node: onnx.NodeProto, shapes) -> int | None:
    op = node.op_type if node.domain in ("", "ai.onnx") else None
    if op in _CONV_OPS:
        w = _input_shape(node, _CONV_OPS[op], shapes)
        out = shapes.get(node.output[0]) if node.output else None
        if not (_known(w) and _known(out)):
            return None
        # out: (N, C_out, *spatial); w: (C_out, C_in/group, *kernel)
        return _numel(out) * _numel(w[1:])
    if op == "ConvTranspose":
        x = _input_shape(node, 0, shapes)
        w = _input_shape(node, 1, shapes)
        if not (_known(w) and _known(x)):
            return None
        # x: (N, C_in, *spatial); w: (C_in, C_out/group, *kernel)
        return _numel(x) * _numel(w[1:])
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
        return _numel(batch) * int(m) * int(n) * int(k)
    return 0


def _symbolic_shapes(shaped: onnx.ModelProto) -> dict[str, tuple[int | None, ...] | None]:
    """Shapes from onnxruntime's symbolic shape inference (sympy), which resolves what ONNX's inference
    leaves unknown, e.g. an attention head size computed by Div from Shape. Best effort: {} on failure."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(shaped, auto_merge=True)
    except Exception as exc:  # missing sympy, unsupported op: MACs stay unknown where they were
        logging.getLogger("onnx_consensus").debug("symbolic shape inference failed: %s", exc)
        return {}
    if inferred is None:
        return {}
    return {k: v for k, v in _shape_map(inferred).items() if v is not None and _known(v)}


def count_cost(
    model: onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    batch_size: int = 1,
) -> ModelCost:
    """Count MACs and parameters of ``model``.

    Args:
        model: the model (not modified; external data need not be loaded).
        input_shapes: full shapes for graph inputs whose non-batch dims are dynamic,
            e.g. ``{"input_ids": (1, 128)}``; these override ``batch_size`` for that input.
        batch_size: value given to a dynamic leading (batch) dim of every other graph input.

    Returns:
        ModelCost with MACs for one batch of ``batch_size`` samples (integers, multiply-accumulates)
        and the parameter count (elements).
    """
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    shaped = _weight_free_copy(model, dict(input_shapes or {}), int(batch_size))
    try:
        shaped = onnx.shape_inference.infer_shapes(shaped, strict_mode=False, data_prop=True)
    except Exception as exc:  # inference is best effort: fall back to the declared shapes
        logging.getLogger("onnx_consensus").warning("shape inference failed (%s); MACs may be unknown", exc)
    shapes = {vi.name: s for vi, s in zip(model.graph.value_info, _value_info_shapes(model.graph.value_info))}
    shapes.update(_shape_map(shaped))
    if any(_node_macs(n, shapes) is None for n in model.graph.node):
        shapes.update(_symbolic_shapes(shaped))
    macs: dict[str, int | None] = {}
    total: int | None = 0
    for node in model.graph.node:
        key = node.output[0] if node.output else node.name
        value = _node_macs(node, shapes)
        macs[key] = value
        if value is None:
            total = None
        elif total is not None:
            total += value
    return ModelCost(macs_per_node=macs, total_macs=total, params=count_params(model))
