"""From residual blocks to candidates: the innermost of nested blocks, whole-layer pairing (``--unit layer``),
and stages (runs of same-shaped blocks) with per-block MACs."""
from __future__ import annotations

from dataclasses import replace

from ..ir import GraphIndex, node_key
from .ops import ATTENTION_OPS
from .records import Block, NotRemovable

UNITS = ("block", "layer")


def innermost(blocks: list[Block], not_removable: list[NotRemovable]) -> list[Block]:
    """Drop candidates that contain another candidate (keep the smallest units) and partial overlaps, each
    recorded in ``not_removable``."""
    keep: list[Block] = []
    node_sets = [set(b.nodes) for b in blocks]
    for i, b in enumerate(blocks):
        if any(j != i and node_sets[j] < node_sets[i] for j in range(len(blocks))):
            not_removable.append(NotRemovable(b.merge, (b.entry,), "contains smaller residual blocks (nested)"))
            continue
        overlap = next((k for k in keep if set(k.nodes) & node_sets[i]), None)
        if overlap is not None:
            not_removable.append(NotRemovable(b.merge, (b.entry,), f"overlaps block {overlap.id}"))
            continue
        keep.append(b)
    return keep


def pair_layers(index: GraphIndex, blocks: list[Block]) -> list[Block]:
    """Merge each attention sub-block with the sub-block that directly follows it (its exit is the other's
    entry) into one whole-layer Block; the layer's id is the second sub-block's exit. Blocks that do not pair
    (a ResNet's) stay as they are."""
    ops = {node_key(n): n.op for n in index.nodes}

    def is_attention(b: Block) -> bool:
        return any(ops.get(k) in ATTENTION_OPS for k in b.nodes)

    ordered = sorted(blocks, key=lambda b: b.position)
    out, i = [], 0
    while i < len(ordered):
        a = ordered[i]
        nxt = ordered[i + 1] if i + 1 < len(ordered) else None
        if nxt is not None and is_attention(a) and not is_attention(nxt) and nxt.entry == a.exit:
            produced = set()
            for k in a.nodes + nxt.nodes:
                node = index.producer.get(k)
                if node is not None:
                    produced.update(t.name for t in node.outputs)
            side = tuple(dict.fromkeys(s for s in a.side_inputs + nxt.side_inputs if s not in produced))
            out.append(replace(nxt, entry=a.entry, nodes=a.nodes + nxt.nodes, side_inputs=side))
            i += 2
        else:
            out.append(a)
            i += 1
    return out


def assign_stages(blocks: list[Block], macs_per_node: dict[str, int | None]) -> list[Block]:
    """Number stages (a ResNet stage: a run of same-shaped blocks) and fill MACs. A block whose entry is the
    exit of a same-shaped block joins that block's stage (so parallel towers, interleaved in topological
    order, keep separate stages); otherwise it joins the stage of the block before it in topological order
    when their shapes match, else starts a new stage."""
    out, stage, prev = [], -1, (object(), -1)
    by_exit: dict[str, tuple[tuple, int]] = {}
    for b in sorted(blocks, key=lambda b: b.position):
        signature = (None if b.shape is None else tuple(d if isinstance(d, int) else '?' for d in b.shape), b.dtype)
        chained = by_exit.get(b.entry)
        if chained is not None and chained[0] == signature:
            this = chained[1]
        elif signature == prev[0]:
            this = prev[1]
        else:
            stage += 1
            this = stage
        prev = by_exit[b.exit] = (signature, this)
        costs = [macs_per_node.get(k, 0) for k in b.nodes]
        macs = None if (not macs_per_node or any(c is None for c in costs)) else int(sum(costs))
        out.append(replace(b, stage=this, macs=macs))
    return out
