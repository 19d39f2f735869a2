"""``find_blocks``: the removable residual blocks of a model, composed from the core, the post-merge rules,
the refusals and the units."""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from ..ir import GraphIndex, node_key, to_gs
from .core import Residual, build_block, match_merge
from .norms import Norms
from .ops import MERGE_OPS
from .post_merge import MergeContext
from .records import BlockReport, NotRemovable
from .refusals import fused_merge, fused_notes, kv_cache, quantized_merge, subgraph_blocks
from .units import UNITS, assign_stages, innermost, pair_layers


def find_blocks(model: onnx.ModelProto | gs.Graph, *, macs_per_node: dict[str, int | None] | None = None,
                unit: str = "block") -> BlockReport:
    """All removable residual blocks of ``model``'s main graph, in topological order.

    macs_per_node (node key -> MACs) fills ``Block.macs``; when omitted it is counted here.
    Nested candidates are reduced to the innermost; blocks in control-flow subgraphs are not considered.
    unit: "block" (default) keeps every residual sub-block a candidate (a transformer's attention and MLP
    sub-blocks separately); "layer" pairs an attention sub-block with the MLP sub-block that directly
    follows it (the exit of one is the entry of the other) into one whole-layer candidate; blocks that do
    not pair (a ResNet's) stay as they are.
    Models whose interface carries a KV cache are refused (``report.refusal``), with no candidates.
    Shapes come from ONNX shape inference, then onnxruntime's symbolic shape inference where ONNX's leaves a
    tensor's rank unknown (``shapes.infer_shapes``); ``-1`` dims count as dynamic, like symbolic ones.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    graph = model if isinstance(model, gs.Graph) else to_gs(model, symbolic=True)
    if macs_per_node is None and isinstance(model, onnx.ModelProto):
        try:
            from ..flops import count_cost

            macs_per_node = count_cost(model).macs_per_node
        except Exception:  # MACs are informative; detection must not depend on them
            macs_per_node = {}
    index = GraphIndex(graph)
    report = BlockReport(unit=unit)
    kv = kv_cache(index)
    if kv:
        report.refusal = (f"the model carries a KV cache ({kv}): removing a layer would change its inputs and "
                          f"outputs, so it is left alone as a generic model; decoder LLMs whose caches are numbered "
                          f"per layer (past_key_values.N.*/present.N.*) are pruned by whole layers on calibration "
                          f"text (README: Decoder LLMs)")
        report.notes.append(report.refusal)
        return report
    found: list[Residual | NotRemovable] = []
    for node in index.nodes:
        fused = fused_merge(node) or quantized_merge(index, node)
        if fused is not None:
            found.append(fused)
        elif node.op in MERGE_OPS:
            match = match_merge(index, node)
            if match is not None:
                found.append(match)
    residuals = [r for r in found if isinstance(r, Residual)]
    norms = Norms(index)
    entries = frozenset(r.entry.name for r in residuals)
    for r in found:
        if isinstance(r, NotRemovable):
            report.not_removable.append(r)
        elif r.problem is not None:
            report.not_removable.append(NotRemovable(node_key(r.merge), r.operands, r.problem))
        else:
            ctx = MergeContext(index, norms, entries, r.entry, r.merge.outputs[0])
            report.blocks.append(build_block(index, r, ctx))
    report.notes.extend(fused_notes(index))
    report.blocks = innermost(report.blocks, report.not_removable)
    report.not_removable.extend(subgraph_blocks(index, find_blocks))
    if unit == "layer":
        report.blocks = pair_layers(index, report.blocks)
    report.blocks = assign_stages(report.blocks, macs_per_node or {})
    return report
