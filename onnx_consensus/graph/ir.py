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

from ..errors import InputError

MODEL_FIELDS = ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string")


def load_model(path: str | os.PathLike, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Read an ONNX file; a missing, empty, corrupt or non-ONNX file raises InputError (one line)."""
    return load_model_and_layout(path, load_external_data=load_external_data)[0]


def load_model_and_layout(path: str | os.PathLike, *,
                          load_external_data: bool = True) -> tuple[onnx.ModelProto, bool]:
    """(model, whether the file keeps weights as external data), parsing the file once; errors as
    ``load_model``.

    External data is not read into the proto: each external tensor's location is made absolute (checked to
    exist and be long enough), and readers map it from the file when they need it (``runtime.external_array``,
    sessions through ``runtime.make_session``), so a model of several GB costs its graph in memory, not its
    weights. ``load_external_data=False`` leaves the locations as they are and checks nothing."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"model path is a directory, not an ONNX file: {path}")
    if os.path.getsize(path) == 0:
        raise InputError(f"model file is empty: {path}")
    try:
        model = onnx.load(path, load_external_data=False)
        external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        if external and load_external_data:
            _absolute_locations(model, os.path.dirname(os.path.abspath(path)))
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        raise InputError(f"cannot read {path} as an ONNX model: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not model.graph.node or not model.opset_import:
        raise InputError(f"{path} is not an ONNX model (no graph nodes or no opset)")
    return model, external


def _absolute_locations(model: onnx.ModelProto, base: str) -> None:
    sizes: dict[str, int] = {}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = os.path.normpath(os.path.join(base, info.get("location", "")))
        if loc not in sizes:
            if not os.path.isfile(loc):
                raise ValueError(f"external data file {loc} (tensor {t.name}) not found")
            sizes[loc] = os.path.getsize(loc)
        n = int(np.prod(t.dims)) if t.dims else 1
        need = int(info.get("offset", 0)) + int(info.get("length", n * np.dtype(
            onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize))
        if need > sizes[loc]:
            raise ValueError(f"external data file {loc} is too short for tensor {t.name}")
        for e in t.external_data:
            if e.key == "location":
                e.value = loc


def node_key(node: gs.Node) -> str:
    """A node's stable identity: its first output tensor's name."""
    return node.outputs[0].name if node.outputs else f"<no-output:{node.name}>"


STUB_LOCATION = "shared-initializers.bin"  # external-data location of stubbed weights (never read)
STUB_MIN_ELEMENTS = 1024


def weightless(model: onnx.ModelProto, min_elements: int = STUB_MIN_ELEMENTS) -> onnx.ModelProto:
    """A copy of ``model`` whose float initializers of at least ``min_elements`` elements are stubs:
    name, dtype and dims kept, data dropped (marked as external data at STUB_LOCATION). Shape inference and
    graph surgery on it cost memory for the graph, not the weights; runtime.SharedWeights supplies the
    values to sessions. Integer and small tensors (shape constants, scalars) keep their data."""
    out = onnx.ModelProto()
    graph = model.graph
    out.CopyFrom(onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import,
                                 metadata_props=model.metadata_props, functions=model.functions,
                                 producer_name=model.producer_name, producer_version=model.producer_version,
                                 domain=model.domain, model_version=model.model_version,
                                 doc_string=model.doc_string))
    g = out.graph
    g.name, g.doc_string = graph.name, graph.doc_string
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(g, field).extend(getattr(graph, field))
    for t in graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        if t.data_type in FLOAT_TYPES and n >= min_elements:
            stub = g.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims,
                                     data_location=onnx.TensorProto.EXTERNAL)
            stub.external_data.add(key="location", value=STUB_LOCATION)
        else:
            g.initializer.add().CopyFrom(t)
    return out


FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
               onnx.TensorProto.DOUBLE)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference (data propagation on) of a weightless copy of ``model``: its value_info holds
    the inferred shapes; its large float initializers are stubs (see ``weightless``)."""
    stub = weightless(model)
    try:
        return onnx.shape_inference.infer_shapes(stub, strict_mode=False, data_prop=True)
    except Exception:
        return onnx.shape_inference.infer_shapes(stub, strict_mode=False)


def to_gs(model: onnx.ModelProto, *, infer: bool = True) -> gs.Graph:
    """Import into onnx-graphsurgeon, topologically sorted. Initializers stay lazy references to the
    model's tensors (no copy); tensors get dtypes and shapes from shape inference on a weightless copy."""
    graph = gs.import_onnx(model)
    if infer:
        inferred = infer_shapes(model)
        known = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
        inputs = {t.name for t in graph.inputs}
        for t in graph.tensors().values():
            if isinstance(t, gs.Variable) and t.name in known and t.name not in inputs:
                tt = known[t.name].type.tensor_type
                if tt.elem_type:
                    t.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
                if tt.HasField("shape"):
                    t.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    return graph.toposort()


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
    return out


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, numpy dtype, and shape with symbolic dims as strings (None = unknown)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...] | None


def _spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    t = vi.type.tensor_type
    dtype = str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)) if t.elem_type else "unknown"
    shape = None
    if t.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
    return TensorSpec(vi.name, dtype, shape)


def interface(model: onnx.ModelProto) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The model's (inputs, outputs) as TensorSpecs; initializer-backed inputs excluded."""
    inits = {i.name for i in model.graph.initializer}
    ins = tuple(_spec(v) for v in model.graph.input if v.name not in inits)
    outs = tuple(_spec(v) for v in model.graph.output)
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
    return None if t.shape is None else tuple(t.shape)


def dtype_of(t: gs.Tensor) -> str | None:
    return None if t.dtype is None else str(np.dtype(t.dtype)) if not isinstance(t.dtype, str) else t.dtype
