"""What detection sees but does not offer for removal: models carrying a KV cache (left alone as a whole),
residual merges fused into one op by onnxruntime's transformer optimizer, and blocks inside control-flow
subgraphs."""
from __future__ import annotations

import logging
from collections.abc import Callable

from ..ir import GraphIndex, node_key, subgraphs
from .ops import ATTENTION_OPS, FUSED_MERGE_OPS, PASS_THROUGH_OPS
from .records import BlockReport, NotRemovable

log = logging.getLogger("onnx_consensus")
KV_NAMES_IN = ("past", "cache")
KV_NAMES_OUT = ("present", "cache")


def kv_cache(index: GraphIndex) -> str | None:
    """The KV-cache tensors of the interface, if any, as text; None when there is no cache.

    Structural tests first: a graph input that reaches a graph output through a Concat (the cache append),
    or a graph input fed to an attention op (past key/value, any input but the first) whose other output
    is a graph output (present key/value). Only when neither holds are names consulted, as a fall-back that
    is logged: inputs named past*/*cache* together with outputs named present*/*cache*."""
    hits = _concat_cache(index) or _attention_cache(index)
    if hits:
        return ", ".join(hits[:4]) + (" ..." if len(hits) > 4 else "")
    ins = [t.name for t in index.graph.inputs if any(k in t.name.lower() for k in KV_NAMES_IN)]
    outs = [t.name for t in index.graph.outputs if any(k in t.name.lower() for k in KV_NAMES_OUT)]
    if ins and outs:
        named = ins + outs
        log.warning("KV cache guessed from tensor names (%s): no input reaches an output through a Concat or an "
                    "attention op", ", ".join(named[:4]))
        return ", ".join(named[:4]) + (" ..." if len(named) > 4 else "") + " (guessed from names)"
    return None


def _through(index: GraphIndex, name: str, *, up: bool) -> list[str]:
    """``name`` and the tensors it passes through unchanged in value (Identity, Transpose, Reshape, ...), up
    to 4 hops, upstream (producers) or downstream (consumers)."""
    seen, frontier = [name], [name]
    for _ in range(4):
        nxt = []
        for t in frontier:
            if up:
                p = index.producer.get(t)
                if p is not None and p.op in PASS_THROUGH_OPS and p.inputs:
                    nxt.append(p.inputs[0].name)
            else:
                nxt += [c.outputs[0].name for c in index.consumers(t) if c.op in PASS_THROUGH_OPS and c.outputs]
        seen += nxt
        frontier = nxt
    return seen


def _concat_cache(index: GraphIndex) -> list[str]:
    in_names = {t.name for t in index.graph.inputs}
    hits = []
    for out in index.graph.outputs:
        for t in _through(index, out.name, up=True):
            node = index.producer.get(t)
            if node is None or node.op != "Concat":
                continue
            for src in node.inputs:
                found = next((s for s in _through(index, src.name, up=True) if s in in_names), None)
                if found is not None:
                    hits.append(f"{found} -> {out.name}")
    return hits


def _attention_cache(index: GraphIndex) -> list[str]:
    out_names = {t.name for t in index.graph.outputs}
    hits = []
    for inp in index.graph.inputs:
        for t in _through(index, inp.name, up=False):
            for node in index.consumers(t):
                if node.op not in ATTENTION_OPS or node.op == "Softmax":
                    continue
                if not any(x.name == t for x in node.inputs[1:]):
                    continue
                for o in node.outputs[1:]:
                    found = next((s for s in _through(index, o.name, up=False) if s in out_names), None)
                    if found is not None:
                        hits.append(f"{inp.name} -> {found}")
    return hits


def fused_merge(node) -> NotRemovable | None:
    """A merge fused with the following norm (SkipLayerNormalization, ...): seen, not removable."""
    if node.op not in FUSED_MERGE_OPS:
        return None
    return NotRemovable(
        node_key(node), tuple(t.name for t in node.inputs[:2] if t.name),
        f"fused {node.op} ({node.domain or 'ai.onnx'}): onnxruntime's transformer optimizer fused the "
        f"residual merge with the following norm; removing the sub-block would need this node rewritten "
        f"into a plain norm, which is not done: prune the unoptimised export, then optimise")


def quantized_merge(index: GraphIndex, node) -> NotRemovable | None:
    """A residual ``QLinearAdd`` (QOperator quantization: one operand computed from the other): seen, not
    removable, since its operands and its output are int8 tensors on three different scales."""
    if node.op != "QLinearAdd" or len(node.inputs) < 4:
        return None
    a, b = node.inputs[0].name, node.inputs[3].name
    if a not in index.ancestors(b)[0] and b not in index.ancestors(a)[0]:
        return None
    return NotRemovable(
        node_key(node), (a, b),
        "QLinearAdd (QOperator quantization): the merge adds int8 tensors quantized on their own scales, so its "
        "entry cannot stand in for its exit; quantize in QDQ format (quant_format=QuantFormat.QDQ) to prune, or "
        "prune the float model, then quantize")


def fused_notes(index: GraphIndex) -> list[str]:
    """One note per kind of fused transformer op in the graph."""
    counts: dict[str, int] = {}
    for n in index.nodes:
        if n.op in FUSED_MERGE_OPS or (n.domain == "com.microsoft" and n.op in ATTENTION_OPS):
            key = f"{n.op} ({n.domain or 'ai.onnx'})"
            counts[key] = counts.get(key, 0) + 1
    notes = []
    for key, c in counts.items():
        if key.split()[0] in FUSED_MERGE_OPS:
            notes.append(f"{c} fused {key}: residual merges inside it are not removable")
        else:
            notes.append(f"{c} fused {key}: handled as an ordinary node inside a branch")
    return notes


def subgraph_blocks(index: GraphIndex, find: Callable[..., BlockReport]) -> list[NotRemovable]:
    """Residual blocks inside control-flow subgraphs (If branches, Loop and Scan bodies), found by ``find``
    (find_blocks) and reported as not removable: they run a data-dependent number of times or only on one
    path, so they are left alone."""
    found = []
    for node in index.nodes:
        for attr, sub in subgraphs(node):
            for b in find(sub, macs_per_node={}).blocks:
                found.append(NotRemovable(b.merge, (b.entry, b.exit),
                                          f"inside the {attr} subgraph of {node.op} node {node.name or node_key(node)}: "
                                          "blocks in control-flow subgraphs are left alone"))
    return found
