"""The part of a pruned decoder that differs from the current one: score a candidate layer without rerunning
the layers before it.

A candidate's model (the current model with one more layer removed, ``kv_surgery.remove_layers``) computes
the same values as the current model up to the layer: same nodes, same inputs. ``cut_suffix`` compares the
two graphs node by node (op, inputs, outputs, attributes) in topological order; a node is *clean* when it
equals the current model's node of the same outputs and reads only clean tensors, graph inputs or
initializers. The suffix is the dirty nodes the requested outputs depend on; its inputs are the clean tensors
they read (the cut: the residual stream before the layer, or the opening norm's inputs in the fused form, and
side tensors such as the causal mask or the rotary tables), which one run of the current model provides, plus
the graph inputs they read. The suffix computes the outputs exactly as the candidate's whole model does, from
the same values: same ops, same order, only fewer of them.

A suffix holds no weights: ``Suffix.model`` names its initializers in ``Suffix.weights`` and
``Suffix.materialize`` takes them from the model they came from (by reference for external data), so
building every candidate's suffix before the current model's run costs graph structure only.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

__all__ = ["Suffix", "changed_tensors", "cut_suffix", "has_subgraphs", "node_signatures"]


@dataclass
class Suffix:
    """model: the suffix graph without initializers (cut inputs declared without type until ``typed``);
    cut: names of the tensors fed from the current model's run; inputs: graph inputs it reads (fed as the
    current model's, same names); weights: names of the initializers it reads; outputs: the requested ones."""

    model: onnx.ModelProto
    cut: tuple[str, ...]
    inputs: tuple[str, ...]
    weights: tuple[str, ...]
    outputs: tuple[str, ...]

    def materialize(self, source: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
        """The runnable suffix: initializers copied from ``source`` by name, cut inputs typed from ``arrays``
        (name -> one batch of the cached value; dims declared symbolic)."""
        out = onnx.ModelProto()
        out.CopyFrom(self.model)
        want = set(self.weights)
        out.graph.initializer.extend(t for t in source.graph.initializer if t.name in want)
        for vi in out.graph.input:
            if vi.name in arrays:
                a = arrays[vi.name]
                vi.CopyFrom(onnx.helper.make_tensor_value_info(
                    vi.name, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), [f"{vi.name}_d{k}" for k in range(a.ndim)]))
        return out


def has_subgraphs(model: onnx.ModelProto) -> bool:
    """Whether any node carries a subgraph (If/Loop/Scan): those read outer tensors implicitly, so the node
    comparison of ``cut_suffix`` would not see every input."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for n in model.graph.node for a in n.attribute)


def _signature(node: onnx.NodeProto) -> bytes:
    """The node as compared: without its name, doc string and the names of its attribute tensors (a
    ``Constant``'s value: graphsurgeon's export, in ``remove_layers``, sets an absent name to "" in the
    tensors it was given, so the same node would serialise differently before and after a removal)."""
    key = onnx.NodeProto()
    key.CopyFrom(node)
    key.name = ""
    key.doc_string = ""
    for a in key.attribute:
        for t in [a.t] if a.HasField("t") else a.tensors:
            t.ClearField("name")
    return key.SerializeToString(deterministic=True)


def node_signatures(model: onnx.ModelProto) -> dict[tuple[str, ...], bytes]:
    """The current model's nodes by their outputs (``cut_suffix``'s reference; compute once per round)."""
    return {tuple(n.output): _signature(n) for n in model.graph.node}


def _dirty_nodes(pruned: onnx.ModelProto, current: dict[tuple[str, ...], bytes]) -> list[onnx.NodeProto]:
    """The nodes of ``pruned`` (topologically sorted) that are not clean against ``current`` (module docstring)."""
    clean: set[str] = {v.name for v in pruned.graph.input} | {t.name for t in pruned.graph.initializer} | {""}
    dirty = []
    for n in pruned.graph.node:
        if current.get(tuple(n.output)) == _signature(n) and all(x in clean for x in n.input):
            clean.update(n.output)
        else:
            dirty.append(n)
    return dirty


def changed_tensors(pruned: onnx.ModelProto, current: dict[tuple[str, ...], bytes]) -> set[str]:
    """The tensors of ``pruned`` whose values may differ from the current model's (``current``: its
    ``node_signatures``): the outputs of its nodes that are not clean. Every other tensor of ``pruned`` that
    the current model also computes has the current model's value."""
    return {o for n in _dirty_nodes(pruned, current) for o in n.output if o}


def cut_suffix(pruned: onnx.ModelProto, current: dict[tuple[str, ...], bytes],
               outputs: Sequence[str]) -> Suffix | None:
    """The suffix of ``pruned`` (topologically sorted) computing ``outputs``, cut where it stops agreeing with
    the current model (``current``: its ``node_signatures``). See the module docstring. None when an output
    does not depend on the removal (the caller runs the whole model then)."""
    inits = {t.name for t in pruned.graph.initializer}
    graph_inputs = {v.name for v in pruned.graph.input}
    dirty_nodes = _dirty_nodes(pruned, current)
    producer = {o: k for k, n in enumerate(dirty_nodes) for o in n.output}
    if any(o not in producer for o in outputs):
        return None
    need, stack = set(), [o for o in outputs if o in producer]
    while stack:
        k = producer[stack.pop()]
        if k in need:
            continue
        need.add(k)
        stack.extend(x for x in dirty_nodes[k].input if x in producer)
    nodes = [n for k, n in enumerate(dirty_nodes) if k in need]
    read = [x for n in nodes for x in n.input if x and x not in producer]
    read = list(dict.fromkeys(read))
    cut = tuple(x for x in read if x not in inits and x not in graph_inputs)
    ins = tuple(x for x in read if x in graph_inputs)
    weights = tuple(x for x in read if x in inits)
    graph = onnx.helper.make_graph(
        [], pruned.graph.name,
        [v for v in pruned.graph.input if v.name in ins] + [onnx.helper.make_empty_tensor_value_info(c) for c in cut],
        [onnx.helper.make_empty_tensor_value_info(o) for o in outputs])
    graph.node.extend(nodes)
    model = onnx.helper.make_model(graph, opset_imports=pruned.opset_import, ir_version=pruned.ir_version)
    return Suffix(model, cut, ins, weights, tuple(outputs))

