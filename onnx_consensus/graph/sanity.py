"""Checks a model file is held to before any pass runs on it: the graph is a graph (no cycle, each tensor
produced once, subgraphs nested no deeper than ``limits.MAX_SUBGRAPH_DEPTH``), and nothing in it asks for more
memory than ``limits.memory_budget()`` (declared shapes, inline tensors, ``ConstantOfShape`` / ``Expand`` /
``Tile`` with constant sizes, sparse tensors densified). Each problem is one ResourceLimitError naming the
tensor or node; the checks read the proto only (no shape inference, no external data), in time linear in its
size, without recursion.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import ResourceLimitError
from ..limits import MAX_SUBGRAPH_DEPTH, format_size, memory_budget
from .weights import all_tensors, is_external, other_tensors, stored_nbytes

#: Constant shape / repeats tensors longer than this are not read (no real shape has more dims).
_MAX_SHAPE_LEN = 64
#: Inline tensors up to this many bytes have their raw data's length checked.
_EXACT_BELOW = 2**16


def check_model(model: onnx.ModelProto, budget: int | None = None) -> None:
    """Raise ResourceLimitError for a hostile or malformed graph (see the module docstring). ``budget``:
    bytes one tensor may take (default ``limits.memory_budget()``)."""
    budget = memory_budget() if budget is None else budget
    graphs = list(_graphs_with_depth(model))
    for graph, _ in graphs:
        _check_names(graph)
        _check_acyclic(graph)
    for graph, _ in graphs:
        _check_declared(graph, budget)
        _check_allocations(graph, budget)
    _check_tensors(model, budget)


def _graphs_with_depth(model: onnx.ModelProto) -> Iterator[tuple[onnx.GraphProto, int]]:
    """(graph, nesting depth) of the main graph (0), its subgraphs and the local functions' subgraphs."""
    stack = [(model.graph, 0)] + [(g, 1) for fn in model.functions for g in _subgraphs(fn.node)]
    while stack:
        graph, depth = stack.pop()
        if depth > MAX_SUBGRAPH_DEPTH:
            raise ResourceLimitError(f"subgraphs nest deeper than {MAX_SUBGRAPH_DEPTH} levels (graph "
                                     f"{graph.name!r}); refusing the model")
        yield graph, depth
        stack.extend((g, depth + 1) for g in _subgraphs(graph.node))


_GRAPH, _GRAPHS = onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS


def _subgraphs(nodes) -> Iterator[onnx.GraphProto]:
    for n in nodes:
        for a in n.attribute:
            if a.type == _GRAPH or a.HasField("g"):
                yield a.g
            elif a.type == _GRAPHS:
                yield from a.graphs


def _check_names(graph: onnx.GraphProto) -> None:
    """Each tensor produced once: no node output named like another's, a graph input or an initializer;
    graph outputs listed once."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    produced: set[str] = set()
    for n in graph.node:
        for name in n.output:
            if not name:
                continue  # an omitted optional output
            if name in produced or name in defined:
                raise ResourceLimitError(f"tensor {name!r} is produced twice (node {n.op_type} {n.name!r}); "
                                         "an ONNX graph assigns each tensor once")
            produced.add(name)
    seen: set[str] = set()
    for v in graph.output:
        if v.name in seen:
            raise ResourceLimitError(f"graph output {v.name!r} is listed twice")
        seen.add(v.name)


def _free_names(node: onnx.NodeProto) -> set[str]:
    """Names a control-flow node's subgraphs read from outside themselves (its implicit inputs)."""
    free: set[str] = set()
    for g in _subgraphs([node]):
        stack = [(g, set())]
        while stack:
            graph, outer_defined = stack.pop()
            local = outer_defined | {v.name for v in graph.input} | {t.name for t in graph.initializer}
            local |= {o for n in graph.node for o in n.output}
            for n in graph.node:
                free.update(i for i in n.input if i and i not in local)
                stack.extend((sub, local) for sub in _subgraphs([n]))
    return free


def _check_acyclic(graph: onnx.GraphProto) -> None:
    """Kahn's algorithm over the graph's nodes (inputs and subgraphs' implicit inputs): a cycle is an error."""
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output if o}
    needs = [0] * len(graph.node)
    users: dict[int, list[int]] = {}
    for k, n in enumerate(graph.node):
        deps = {producer[i] for i in set(n.input) | _free_names(n) if i in producer}
        needs[k] = len(deps)
        for d in deps:
            users.setdefault(d, []).append(k)
    ready = [k for k, c in enumerate(needs) if c == 0]
    done = 0
    while ready:
        k = ready.pop()
        done += 1
        for u in users.get(k, ()):
            needs[u] -= 1
            if needs[u] == 0:
                ready.append(u)
    if done < len(graph.node):
        stuck = next(n for k, n in enumerate(graph.node) if needs[k] > 0)
        raise ResourceLimitError(f"the graph has a cycle (through node {stuck.op_type} {stuck.name!r}, output "
                                 f"{stuck.output[0] if stuck.output else '?'!r}); refusing the model")


def _itemsize(elem_type: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except Exception:  # noqa: BLE001 - undefined or exotic types: count one byte per element
        return 1


def _over(name: str, what: str, nbytes: int, budget: int) -> None:
    if nbytes > budget:
        raise ResourceLimitError(f"{what} {name!r} would take {format_size(nbytes)}, over the memory budget of "
                                 f"{format_size(budget)}; refusing the model")


def _check_declared(graph: onnx.GraphProto, budget: int) -> None:
    """Declared static shapes (inputs, outputs, value_info): unknown and non-positive dims count as 1."""
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        tt = v.type.tensor_type if v.type.HasField("tensor_type") else None
        if tt is None or not tt.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
        _over(v.name, "tensor", math.prod(dims) * _itemsize(tt.elem_type), budget)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Small inline integer tensors of ``graph`` by name (initializers and Constant nodes): shapes, repeats."""
    out: dict[str, np.ndarray] = {}
    tensors = [(t.name, t) for t in graph.initializer]
    tensors += [(n.output[0], a.t) for n in graph.node if n.op_type == "Constant" and n.output
                for a in n.attribute if a.name == "value" and a.HasField("t")]
    for name, t in tensors:
        if t.data_type in (TensorProto.INT64, TensorProto.INT32) and len(t.dims) <= 1 and not is_external(t) \
                and math.prod(t.dims) <= _MAX_SHAPE_LEN:
            try:
                out[name] = numpy_helper.to_array(t).astype(np.int64).ravel()
            except Exception:  # noqa: BLE001 - a malformed tensor is reported by _check_tensors
                continue
    for n in graph.node:  # ints given as attributes (Constant value_ints)
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value_ints" and len(a.ints) <= _MAX_SHAPE_LEN:
                    out[n.output[0]] = np.asarray(a.ints, np.int64)
    return out


def _check_allocations(graph: onnx.GraphProto, budget: int) -> None:
    """ConstantOfShape / Expand / Tile whose sizes are constants: their output's size (at least)."""
    consts = _constants(graph)
    for n in graph.node:
        if n.op_type == "ConstantOfShape" and n.input and n.input[0] in consts:
            value = next((a.t for a in n.attribute if a.name == "value" and a.HasField("t")), None)
            size = _itemsize(value.data_type) if value is not None else 4
            _over(n.output[0], "ConstantOfShape output", _prod(consts[n.input[0]]) * size, budget)
        elif n.op_type == "Expand" and len(n.input) > 1 and n.input[1] in consts:
            _over(n.output[0], "Expand output", _prod(consts[n.input[1]]), budget)
        elif n.op_type == "Tile" and len(n.input) > 1 and n.input[1] in consts:
            _over(n.output[0], "Tile output", _prod(consts[n.input[1]]), budget)


def _prod(values: np.ndarray) -> int:
    return math.prod(max(int(v), 1) for v in values)


def _check_tensors(model: onnx.ModelProto, budget: int) -> None:
    """Inline tensors: their declared size within the budget and their data as long as their dims say; external
    tensors outside the main graph's initializers (read whole into each session, ``runtime``) within the budget;
    sparse tensors' dense size within the budget."""
    for t in other_tensors(model):
        if t.data_location == TensorProto.EXTERNAL and t.data_type != TensorProto.STRING:
            _over(t.name, "external tensor", stored_nbytes(t), budget)
    for t in all_tensors(model):
        if t.data_location == TensorProto.EXTERNAL:
            continue  # checked against its file by weights.absolute_locations; mapped, not loaded
        need = stored_nbytes(t) if t.data_type != TensorProto.STRING else 0
        _over(t.name, "tensor", need, budget)
        if t.data_type == TensorProto.STRING:
            continue
        if t.HasField("raw_data"):
            # reading raw_data copies it: only small tensors are measured (a large one too short is an
            # onnxruntime error, not an allocation)
            if need <= _EXACT_BELOW and len(t.raw_data) != need:
                raise ResourceLimitError(f"tensor {t.name!r} declares dims {list(t.dims)} ({need} bytes) but holds "
                                         f"{len(t.raw_data)} bytes")
        elif need and not any(len(getattr(t, f)) for f in ("float_data", "int32_data", "int64_data", "double_data",
                                                           "uint64_data")):
            raise ResourceLimitError(f"tensor {t.name!r} declares dims {list(t.dims)} but holds no data")
    for graph, _ in _graphs_with_depth(model):
        sparse = list(graph.sparse_initializer) + [a.sparse_tensor for n in graph.node for a in n.attribute
                                                   if a.HasField("sparse_tensor")]
        for sp in sparse:
            _over(sp.values.name, "sparse tensor", math.prod(max(int(d), 1) for d in sp.dims)
                  * _itemsize(sp.values.data_type), budget)
