"""Loading models and the small graph queries every pass needs, on onnx-graphsurgeon's IR.

The graph is imported once per pass (``to_gs``) after ONNX shape inference, so tensors carry dtypes and
(symbolic) shapes. Nodes are identified by their first output tensor's name ("node key"), which exporters
keep unique; node names are often empty or duplicated, so they are never relied on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import ConsensusError, InputError
from .sanity import check_model
from .weights import absolute_locations, all_tensors

MODEL_FIELDS = ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string")


def load_model(path: str | os.PathLike, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Read an ONNX file; a missing, empty, corrupt or non-ONNX file raises InputError (one line)."""
    return load_model_and_layout(path, load_external_data=load_external_data)[0]


def load_model_and_layout(path: str | os.PathLike, *,
                          load_external_data: bool = True) -> tuple[onnx.ModelProto, bool]:
    """(model, whether the file keeps weights as external data), parsing the file once; errors as
    ``load_model``.

    External data is not read into the proto: each external tensor's location is made absolute (checked to
    be a regular file inside the model's folder, long enough for the tensor; ``weights.absolute_locations``),
    and readers map it from the file when they need it (``weights.external_array``, sessions through
    ``runtime.make_session``), so a model of several GB costs its graph in memory, not its weights. The graph
    is then checked against the limits for untrusted models (``sanity.check_model``: cycles, tensors produced
    twice, nesting depth, allocations over the memory budget). ``load_external_data=False`` leaves the
    locations as they are and checks none of them (the graph checks still run)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"model path is a directory, not an ONNX file: {path}")
    if os.path.getsize(path) == 0:
        raise InputError(f"model file is empty: {path}")
    try:
        model = onnx.load(path, load_external_data=False)
        external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(model))
        if external and load_external_data:
            absolute_locations(model, os.path.dirname(os.path.abspath(path)))
        check_model(model)
    except ConsensusError as exc:
        raise type(exc)(f"cannot read {path}: {exc}") from None
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        raise InputError(f"cannot read {path} as an ONNX model: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not model.graph.node or not model.opset_import:
        raise InputError(f"{path} is not an ONNX model (no graph nodes or no opset)")
    return model, external


def node_key(node: gs.Node | onnx.NodeProto) -> str:
    """A node's stable identity: its first output tensor's name (a graphsurgeon Node or a NodeProto)."""
    if isinstance(node, onnx.NodeProto):
        return node.output[0] if node.output else f"<no-output:{node.name}>"
    return node.outputs[0].name if node.outputs else f"<no-output:{node.name}>"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's declared type (a graph input or output, a value_info entry).

    Attributes:
        name: tensor name.
        dtype: numpy dtype of the elements (an ml_dtypes type for bfloat16 and the float8 types); None when
            the element type is undeclared, the value is not a tensor, or the type has no numpy counterpart.
        shape: one entry per dim: an int (> 0) for a static dim, a str (symbolic name) or None for a dynamic
            one (a missing value, and ``-1`` or ``0`` written as a dim value, as Paddle writes a dynamic batch);
            the whole shape is None when none is declared (rank unknown). For model inputs dim 0 is taken
            to be the batch dim.
    """

    name: str
    dtype: np.dtype | None
    shape: tuple[int | str | None, ...] | None


def tensor_spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    """Parse a ValueInfo's element type and shape: the one place the project reads them (``interface``,
    ``to_gs``, the calibration data's input specs, the MAC counter)."""
    tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
    if tt is None:
        return TensorSpec(vi.name, None, None)
    dtype = None
    if tt.elem_type:
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except Exception:  # an element type this onnx/numpy cannot express
            dtype = None
    shape = None
    if tt.HasField("shape"):
        shape = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                      for d in tt.shape.dim)
    return TensorSpec(vi.name, dtype, shape)


def infer_shapes(model: onnx.ModelProto, *, symbolic: bool = False):
    """Shapes of ``model``'s tensors (``shapes.infer_shapes`` on a weight-free copy): ONNX shape inference, then,
    with ``symbolic``, onnxruntime's symbolic shape inference where ONNX's leaves a node output's rank unknown.
    Returns ``shapes.InferredShapes``."""
    from .shapes import infer_shapes as _infer

    return _infer(model, enough=None if symbolic else (lambda m, s: True))


def to_gs(model: onnx.ModelProto, *, infer: bool = True, symbolic: bool = False) -> gs.Graph:
    """Import into onnx-graphsurgeon, topologically sorted. Initializers stay lazy references to the
    model's tensors (no copy); tensors get dtypes and shapes from shape inference on a weight-free copy
    (``infer_shapes``; ``symbolic`` as there: block detection asks for it). Graph inputs keep their declared
    shapes (a ``-1`` dim stays -1 in the IR, so the exported interface is unchanged; ``shape_of`` reads it as
    dynamic)."""
    graph = gs.import_onnx(model)
    if infer:
        inferred = infer_shapes(model, symbolic=symbolic)
        known = {v.name: v for g in _graphs(inferred.model.graph) for v in list(g.value_info) + list(g.output)}
        inputs = {t.name for t in graph.inputs}
        for t in graph.tensors().values():
            if isinstance(t, gs.Variable) and t.name in known and t.name not in inputs:
                spec = tensor_spec(known[t.name])
                if spec.dtype is not None:
                    t.dtype = spec.dtype
                shape = inferred.shapes.get(t.name, spec.shape)
                if shape is not None:
                    t.shape = list(shape)
    return graph.toposort()


def _graphs(graph: onnx.GraphProto):
    from .shapes import all_graphs

    return all_graphs(graph)


def from_gs(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` and restore the model-level fields of ``like`` that gs.export_onnx drops
    (metadata_props, doc string, domain, model version, opset imports, ir version, functions)."""
    out = gs.export_onnx(graph, do_type_check=False)
    # Keep only the value_info the input declared: inferred shapes of every tensor change which fusions
    # onnxruntime applies (measured slower on a pruned ViT), and the file should differ only by the removal.
    declared = {v.name for v in like.graph.value_info}
    keep = [v for v in out.graph.value_info if v.name in declared]
    del out.graph.value_info[:]
    out.graph.value_info.extend(keep)
    for field in MODEL_FIELDS:
        setattr(out, field, getattr(like, field))
    del out.opset_import[:]
    out.opset_import.extend(like.opset_import)
    del out.metadata_props[:]
    out.metadata_props.extend(like.metadata_props)
    del out.functions[:]
    out.functions.extend(like.functions)
    if out.ir_version < 4:  # IR 3 (old caffe2 / zoo exports): every initializer must also be a graph input
        declared = {v.name: v for v in like.graph.input}
        listed = {v.name for v in out.graph.input}
        for t in out.graph.initializer:
            if t.name not in listed:
                out.graph.input.append(declared.get(t.name) or onnx.helper.make_tensor_value_info(
                    t.name, t.data_type, list(t.dims)))
    return out


def interface(model: onnx.ModelProto) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The model's (inputs, outputs) as TensorSpecs; initializer-backed inputs excluded."""
    inits = {i.name for i in model.graph.initializer}
    ins = tuple(tensor_spec(v) for v in model.graph.input if v.name not in inits)
    outs = tuple(tensor_spec(v) for v in model.graph.output)
    return ins, outs


class GraphIndex:
    """Producer/consumer maps, topological positions and data-dependence of a gs.Graph."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.nodes: list[gs.Node] = list(graph.nodes)
        self.position = {id(n): i for i, n in enumerate(self.nodes)}
        self.producer: dict[str, gs.Node] = {}
        for n in self.nodes:
            for t in n.outputs:
                self.producer[t.name] = n
        self.tensors = graph.tensors()
        # Nodes of control-flow subgraphs (If/Loop/Scan bodies) that read a main-graph tensor from the outer
        # scope are consumers of it; they count as their enclosing main-graph node, and the tensor counts as
        # an (implicit) input of that node.
        self.owner: dict[int, gs.Node] = {}
        self._implicit: dict[int, list[gs.Tensor]] = {}
        for n in self.nodes:
            implicit: dict[int, gs.Tensor] = {}
            for _, sub in subgraphs(n):
                for inner in _all_nodes(sub):
                    self.owner[id(inner)] = n
                    implicit.update((id(t), t) for t in inner.inputs if self.tensors.get(t.name) is t)
            if implicit:
                self._implicit[id(n)] = list(implicit.values())
        self.output_names = {t.name for t in graph.outputs}
        # Tensors that depend on a graph input (the data path); constants and constant subgraphs don't.
        # In a subgraph, tensors read from the outer scope (no producer here, not constants) are data too.
        self.data: set[str] = {t.name for t in graph.inputs} | {
            t.name for n in self.nodes for t in self.inputs_of(n)
            if isinstance(t, gs.Variable) and t.name and t.name not in self.producer}
        for n in self.nodes:
            if any(isinstance(t, gs.Variable) and t.name in self.data for t in self.inputs_of(n)):
                self.data.update(t.name for t in n.outputs)

    def inputs_of(self, node: gs.Node) -> list[gs.Tensor]:
        """``node``'s inputs, plus for a control-flow node the outer-scope tensors its subgraphs read."""
        return list(node.inputs) + self._implicit.get(id(node), [])

    def consumers(self, name: str) -> list[gs.Node]:
        """Main-graph nodes reading tensor ``name``, a control-flow node standing for its subgraphs' reads."""
        if name not in self.tensors:
            return []
        out, seen = [], set()
        for c in self.tensors[name].outputs:
            node = c if id(c) in self.position else self.owner.get(id(c))
            if node is not None and id(node) not in seen:
                seen.add(id(node))
                out.append(node)
        return out

    def ancestors(self, name: str) -> tuple[set[str], set[int]]:
        """(tensor names, node ids) upstream of tensor ``name`` (inclusive of ``name``)."""
        tensors, nodes, stack = {name}, set(), [name]
        while stack:
            node = self.producer.get(stack.pop())
            if node is None or id(node) in nodes:
                continue
            nodes.add(id(node))
            for t in self.inputs_of(node):
                if t.name and t.name not in tensors:
                    tensors.add(t.name)
                    stack.append(t.name)
        return tensors, nodes

    def descendants(self, name: str, *, limit: int | None = None) -> set[int]:
        """Node ids downstream of tensor ``name`` (nodes at topological position <= limit only)."""
        seen: set[int] = set()
        stack = [name]
        while stack:
            for node in self.consumers(stack.pop()):
                if id(node) in seen or (limit is not None and self.position[id(node)] > limit):
                    continue
                seen.add(id(node))
                stack.extend(t.name for t in node.outputs)
        return seen

    def is_data(self, t: gs.Tensor) -> bool:
        return isinstance(t, gs.Variable) and t.name in self.data


def subgraphs(node: gs.Node) -> list[tuple[str, gs.Graph]]:
    """(attribute name, subgraph) of a control-flow node (If branches, Loop/Scan bodies); [] for others."""
    subs = []
    for name, value in node.attrs.items():
        if isinstance(value, gs.Graph):
            subs.append((name, value))
        elif isinstance(value, (list, tuple)):
            subs.extend((name, v) for v in value if isinstance(v, gs.Graph))
    return subs


def _all_nodes(graph: gs.Graph):
    """Every node of ``graph`` and of its nested subgraphs."""
    for n in graph.nodes:
        yield n
        for _, sub in subgraphs(n):
            yield from _all_nodes(sub)


def shape_of(t: gs.Tensor) -> tuple | None:
    """``t``'s shape, a non-positive int dim (``-1``, as Paddle writes a dynamic batch) read as None (dynamic)."""
    if t.shape is None:
        return None
    return tuple(None if isinstance(d, (int, np.integer)) and d <= 0 else d for d in t.shape)


def dtype_of(t: gs.Tensor) -> str | None:
    return None if t.dtype is None else str(np.dtype(t.dtype)) if not isinstance(t.dtype, str) else t.dtype
