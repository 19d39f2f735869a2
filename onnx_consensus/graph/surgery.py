"""Removing blocks: rewire each exit's consumers to its entry, then clean up and sort (onnx-graphsurgeon).

What to remove (a list of Blocks) is decided elsewhere; this module only knows how.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx
import onnx_graphsurgeon as gs

from ..errors import InputError
from .blocks import Block
from .ir import from_gs, interface, to_gs
from .quant import drop_requantization


def remove_blocks(model: onnx.ModelProto, blocks: Iterable[Block]) -> onnx.ModelProto:
    """A copy of ``model`` without ``blocks``; the input model is not modified.

    Each exit's consumers read the (already rewired) entry instead; an exit that is a graph output becomes
    ``Identity(entry)`` under the same name, so the interface (names, dtypes, shapes) is unchanged. In a QDQ
    graph the exit's re-quantization goes too (``quant.drop_requantization``).
    """
    blocks = sorted(blocks, key=lambda b: b.position)
    if not blocks:
        return _copy(model)
    graph = to_gs(model)
    subst = rewire(graph, blocks)
    drop_requantization(graph, set(subst.values()))  # QDQ graphs: the entry's own scale and zero point
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = from_gs(graph, like=model)
    _restore_interface(out, model)
    if interface(out) != interface(model):
        raise InputError("internal error: removal changed the model's interface")  # never expected
    return out


def rewire(graph: gs.Graph, blocks: Sequence[Block]) -> dict[str, str]:
    """Rewire ``graph`` in place so that ``blocks`` (sorted by position) are bypassed; returns the
    substitution exit name -> final entry name. Dead nodes stay until ``graph.cleanup()``."""
    tensors = graph.tensors()
    outputs = {t.name for t in graph.outputs}
    subst: dict[str, str] = {}

    def resolve(name: str) -> str:
        while name in subst:
            name = subst[name]
        return name

    for block in blocks:
        if block.exit not in tensors:
            raise InputError(f"block {block.id} is not in this graph")
        entry = tensors[resolve(block.entry)]
        exit_t = tensors[block.exit]
        for consumer in list(exit_t.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is exit_t:
                    consumer.inputs[i] = entry
        if block.exit in outputs:
            exit_t.inputs.clear()  # detach from the block's last node, keep the name as graph output
            graph.nodes.append(gs.Node("Identity", name=f"{block.exit}/bypass", inputs=[entry], outputs=[exit_t]))
        subst[block.exit] = entry.name
    return subst


def _restore_interface(out: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Put back the original graph input/output declarations (shape inference may have refined them)."""
    for field in ("input", "output"):
        original = {v.name: v for v in getattr(model.graph, field)}
        for v in getattr(out.graph, field):
            if v.name in original:
                v.CopyFrom(original[v.name])


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
