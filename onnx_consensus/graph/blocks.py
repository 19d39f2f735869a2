"""Finding removable residual blocks on the ONNX graph itself, whatever exported it.

A removable block is a single-entry, single-exit region whose exit tensor has the entry's shape and dtype
and which holds a residual merge: an ``Add`` (or two-input ``Sum``) whose one operand is the entry (the skip
path) and whose other operand is computed from it (the branch). Replacing every use of the exit by the entry
removes the block. Detection reads only the graph's structure, never node or tensor names.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import onnx
import onnx_graphsurgeon as gs

from .ir import GraphIndex, dtype_of, node_key, shape_of, to_gs

MERGE_OPS = ("Add", "Sum")
# Operators after the merge that belong to the block (ResNet's ReLU: exact to drop when the entry is
# already non-negative, as it is after the previous block's ReLU).
POST_MERGE_OPS = ("Relu",)
# A normalisation after the merge belongs to the block when the entry comes out of the same kind of
# normalisation (post-LN transformers: LN(x + F(x)) with x an LN output); a final norm of a pre-LN network
# (whose entry is a residual sum) stays outside.
POST_MERGE_NORMS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "AveragePool", "MaxPool",
               "GlobalAveragePool", "Pad", "Resize", "Slice", "Reshape", "Transpose")


@dataclass(frozen=True)
class Block:
    """A removable residual block. ``id`` is its exit tensor's name in the original graph.

    nodes: keys (first output names) of the block's nodes in topological order, merge and post-merge ops
    included. side_inputs: non-constant tensors the branch reads from outside the block (masks, tables).
    shape: the exit's shape, symbolic dims as strings. macs: multiply-accumulates per sample (None if unknown).
    stage: index of the run of consecutive same-shaped blocks it belongs to.
    """

    id: str
    entry: str
    exit: str
    merge: str
    nodes: tuple[str, ...]
    side_inputs: tuple[str, ...] = ()
    shape: tuple | None = None
    dtype: str | None = None
    macs: int | None = None
    stage: int = 0
    position: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        d["n_nodes"] = len(self.nodes)
        d["shape"] = list(self.shape) if self.shape is not None else None
        d["nodes"] = list(self.nodes)
        d["side_inputs"] = list(self.side_inputs)
        return d


@dataclass(frozen=True)
class NotRemovable:
    """A residual merge that was seen but cannot become an identity, with the reason."""

    merge: str
    operands: tuple[str, ...]
    reason: str

    def to_json(self) -> dict:
        return {"merge": self.merge, "operands": list(self.operands), "reason": self.reason}


@dataclass
class BlockReport:
    blocks: list[Block] = field(default_factory=list)
    not_removable: list[NotRemovable] = field(default_factory=list)

    def by_id(self) -> dict[str, Block]:
        return {b.id: b for b in self.blocks}


def find_blocks(model: onnx.ModelProto | gs.Graph, *, macs_per_node: dict[str, int | None] | None = None) -> BlockReport:
    """All removable residual blocks of ``model``'s main graph, in topological order.

    macs_per_node (node key -> MACs) fills ``Block.macs``; when omitted it is counted here.
    Nested candidates are reduced to the innermost; blocks in control-flow subgraphs are not considered.
    """
    graph = model if isinstance(model, gs.Graph) else to_gs(model)
    if macs_per_node is None and isinstance(model, onnx.ModelProto):
        try:
            from .flops import count_cost

            macs_per_node = count_cost(model).macs_per_node
        except Exception:  # MACs are informative; detection must not depend on them
            macs_per_node = {}
    index = GraphIndex(graph)
    report = BlockReport()
    for node in index.nodes:
        if node.op not in MERGE_OPS:
            continue
        found = _match_residual(index, node)
        if isinstance(found, NotRemovable):
            report.not_removable.append(found)
        elif found is not None:
            report.blocks.append(found)
    report.blocks = _innermost(report.blocks, report.not_removable)
    report.blocks = _assign_stages(report.blocks, macs_per_node or {})
    return report


def _match_residual(index: GraphIndex, merge: gs.Node) -> Block | NotRemovable | None:
    merge_key = node_key(merge)
    operands = [t for t in merge.inputs]
    if len(operands) != 2 or not all(index.is_data(t) for t in operands):
        return None  # bias adds, constant offsets, n-ary sums: not residual merges
    a, b = operands
    out = merge.outputs[0]
    anc_a, _ = index.ancestors(a.name)
    anc_b, _ = index.ancestors(b.name)
    if a.name in anc_b and a.name != b.name:
        entry, branch_out = a, b
    elif b.name in anc_a and a.name != b.name:
        entry, branch_out = b, a
    else:
        if shape_of(a) is None or not same_shape(a, b) or not same_shape(a, out):
            return None  # broadcast adds (masks, biases computed at run time): not residual merges
        common = anc_a & anc_b
        if not common:
            return None  # two independent inputs
        skip_ops = _path_ops(index, common, a, b)
        return NotRemovable(merge_key, (a.name, b.name),
                            f"projection shortcut: the skip path computes ({', '.join(skip_ops) or 'ops'})")
    if shape_of(entry) is None or shape_of(out) is None:
        return NotRemovable(merge_key, (a.name, b.name), "shape unknown after shape inference")
    if not same_shape(entry, out) or dtype_of(entry) != dtype_of(out):
        return NotRemovable(merge_key, (a.name, b.name),
                            f"shape change: entry {list(shape_of(entry))} vs exit {list(shape_of(out))}")
    # Branch: nodes downstream of the entry and upstream of the branch output.
    limit = index.position[id(merge)]
    down = index.descendants(entry.name, limit=limit)
    _, up = index.ancestors(branch_out.name)
    branch = [n for n in index.nodes if id(n) in down and id(n) in up]
    members = {id(n) for n in branch} | {id(merge)}
    # Single exit: nothing outside the block may read a branch tensor.
    for n in branch:
        for t in n.outputs:
            if t.name in index.output_names:
                return NotRemovable(merge_key, (a.name, b.name), f"branch tensor {t.name} is a graph output")
            if any(id(c) not in members for c in t.outputs):
                return NotRemovable(merge_key, (a.name, b.name), f"branch tensor {t.name} is read outside the block")
    nodes = branch + [merge]
    exit_t = out
    while exit_t.name not in index.output_names and len(exit_t.outputs) == 1:
        nxt = exit_t.outputs[0]
        entry_op = index.producer[entry.name].op if entry.name in index.producer else None
        follows = nxt.op in POST_MERGE_OPS or (nxt.op in POST_MERGE_NORMS and entry_op == nxt.op)
        if not follows or not same_shape(nxt.outputs[0], out) or len(
                [t for t in nxt.outputs if t.outputs or t.name in index.output_names]) != 1:
            break
        nodes.append(nxt)
        exit_t = nxt.outputs[0]
    produced = {t.name for n in nodes for t in n.outputs}
    side = []
    for n in nodes:
        for t in n.inputs:
            if index.is_data(t) and t.name != entry.name and t.name not in produced and t.name not in side:
                side.append(t.name)
    return Block(
        id=exit_t.name, entry=entry.name, exit=exit_t.name, merge=merge_key,
        nodes=tuple(node_key(n) for n in nodes), side_inputs=tuple(side),
        shape=shape_of(entry), dtype=dtype_of(entry), position=index.position[id(merge)],
    )


def same_shape(a: gs.Tensor, b: gs.Tensor) -> bool:
    """Same rank and equal static dims; two symbolic or unknown dims are taken as equal (a graph output
    may declare its batch dim under another name than the input's)."""
    sa, sb = shape_of(a), shape_of(b)
    if sa is None or sb is None or len(sa) != len(sb):
        return False
    return all(x == y or not (isinstance(x, int) and isinstance(y, int)) for x, y in zip(sa, sb))


def _path_ops(index: GraphIndex, common: set[str], a: gs.Tensor, b: gs.Tensor) -> list[str]:
    """Op types on the shorter operand path from the latest common ancestor (the skip path's ops)."""
    latest = max(common, key=lambda name: index.position.get(id(index.producer.get(name)), -1)
                 if name in index.producer else -1)
    paths = []
    for t in (a, b):
        _, up = index.ancestors(t.name)
        down = index.descendants(latest)
        paths.append([n.op for n in index.nodes if id(n) in up and id(n) in down])
    return min(paths, key=len)


def _innermost(blocks: list[Block], not_removable: list[NotRemovable]) -> list[Block]:
    """Drop candidates that contain another candidate (keep the smallest units); drop partial overlaps."""
    keep = []
    node_sets = [set(b.nodes) for b in blocks]
    for i, b in enumerate(blocks):
        contains_other = any(j != i and node_sets[j] < node_sets[i] for j in range(len(blocks)))
        if contains_other:
            not_removable.append(NotRemovable(b.merge, (b.entry,), "contains smaller residual blocks (nested)"))
            continue
        overlap = next((k for k in keep if set(k.nodes) & node_sets[i]), None)
        if overlap is not None:
            not_removable.append(NotRemovable(b.merge, (b.entry,), f"overlaps block {overlap.id}"))
            continue
        keep.append(b)
    return keep


def _assign_stages(blocks: list[Block], macs_per_node: dict[str, int | None]) -> list[Block]:
    """Number runs of consecutive same-shaped blocks (a ResNet stage) and fill MACs."""
    out, stage, prev = [], -1, object()
    for b in sorted(blocks, key=lambda b: b.position):
        signature = (None if b.shape is None else tuple(d if isinstance(d, int) else '?' for d in b.shape), b.dtype)
        if signature != prev:
            stage += 1
            prev = signature
        costs = [macs_per_node.get(k, 0) for k in b.nodes]
        macs = None if (not macs_per_node or any(c is None for c in costs)) else int(sum(costs))
        out.append(replace(b, stage=stage, macs=macs))
    return out
