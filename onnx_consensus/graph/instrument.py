"""Instrumented and suffix models for scoring.

- ``expose``: the model with extra graph outputs (block entries/exits, the feature tensor).
- ``suffix_model``: the part of a graph after a cut, as a model whose inputs are the cut tensors; with a
  block bypassed first, it computes "the feature tensor without block b" from cached activations, so the
  part of the network before b never runs again.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from ..errors import InputError
from .blocks import Block
from .ir import GraphIndex, from_gs, to_gs
from .surgery import rewire



def expose(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs also include ``names`` (existing outputs kept first)."""
    graph = to_gs(model)
    tensors = graph.tensors()
    have = {t.name for t in graph.outputs}
    for name in names:
        if name in have:
            continue
        if name not in tensors:
            raise InputError(f"tensor {name} is not in the model")
        graph.outputs.append(tensors[name])
        have.add(name)
    return from_gs(graph, like=model)


@dataclass(frozen=True)
class Suffix:
    """A suffix model: ``model`` maps ``inputs`` (cut tensors, taken from the full model's run) to ``outputs``.

    ``passthrough`` is set when the requested outputs do not depend on the block at all (then model is None
    and the outputs equal the full model's).
    """

    model: onnx.ModelProto | None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    passthrough: bool = False


def suffix_model(model: onnx.ModelProto, block: Block, outputs: Sequence[str]) -> Suffix:
    """The graph after ``block``'s entry, with ``block`` bypassed, computing ``outputs``.

    The cut is every non-constant tensor that the suffix reads but does not compute: the block's entry,
    plus side tensors such as masks or long skips (computed by the full model's run, or graph inputs).
    """
    graph = to_gs(model)
    rewire(graph, [block])  # the block's nodes become dead: nothing downstream reads its exit any more
    index = GraphIndex(graph)
    tensors = index.tensors
    for name in outputs:
        if name not in tensors:
            raise InputError(f"tensor {name} is not in the model")
    down = index.descendants(block.entry)
    up: set[int] = set()
    for name in outputs:
        up |= index.ancestors(name)[1]
    suffix_nodes = [n for n in index.nodes if id(n) in up and (id(n) in down or not _data_node(index, n))]
    if not any(id(n) in down for n in suffix_nodes):
        return Suffix(None, (), tuple(outputs), passthrough=True)
    produced = {t.name for n in suffix_nodes for t in n.outputs}
    cut: list[gs.Variable] = []
    for n in suffix_nodes:
        for t in index.inputs_of(n):
            if index.is_data(t) and t.name not in produced and t not in cut:
                cut.append(t)
    for t in cut:
        t.inputs.clear()
    graph.inputs = cut
    graph.outputs = [tensors[name] for name in outputs]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return Suffix(from_gs(graph, like=model), tuple(t.name for t in cut), tuple(outputs))


def _data_node(index: GraphIndex, node: gs.Node) -> bool:
    return any(index.is_data(t) for t in index.inputs_of(node))


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names`` (declared without type; cheap: no graph
    rebuild, external weights stay where they are)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for n in names:
        if n not in have:
            out.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
            have.add(n)
    return out
