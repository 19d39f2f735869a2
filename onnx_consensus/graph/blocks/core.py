"""The residual core: which operand of a merge is the skip path (the entry), the branch between the entry and
the merge, and the checks that make the region removable (a learned branch, same shape and dtype, a single
exit)."""
from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

from ..ir import GraphIndex, dtype_of, node_key, shape_of, subgraphs
from .ops import WEIGHTED_OPS

# What a projection shortcut's skip path computes (a 1x1 conv, a MatMul, pooling, zero channel padding); a merge
# of two computed values whose shorter path has none of these is no residual merge at all.
PROJECTION_OPS = set(WEIGHTED_OPS) | {"AveragePool", "MaxPool", "GlobalAveragePool", "Pad", "LpPool"}
from .post_merge import MergeContext, extend
from .records import Block, NotRemovable
from .shapes import same_shape


@dataclass
class Residual:
    """A merge whose one operand (``entry``) is an ancestor of the other (``branch_out``). branch: the nodes
    downstream of the entry and upstream of branch_out, in topological order. problem: why the region cannot
    become an identity (shape change, a second exit, ...), None when it can."""

    merge: gs.Node
    operands: tuple[str, str]
    entry: gs.Tensor
    branch_out: gs.Tensor
    branch: list[gs.Node]
    problem: str | None = None


def match_merge(index: GraphIndex, merge: gs.Node) -> Residual | NotRemovable | None:
    """Classify a two-operand Add/Sum: a Residual (possibly with a problem), a projection shortcut
    (NotRemovable: the shorter path has a weighted op, pooling or padding, the longer one learned weights), or
    None when it is no residual merge (bias adds, broadcasts, independent operands, a branch without learned
    weights, two computed values added such as a box decode or BERT's embedding sum)."""
    operands = list(merge.inputs)
    if len(operands) != 2 or not all(index.is_data(t) for t in operands):
        return None  # bias adds, constant offsets, n-ary sums: not residual merges
    a, b = operands
    names = (a.name, b.name)
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
        skip_ops, branch_ops = _path_ops(index, common, a, b)
        if not (set(skip_ops) & PROJECTION_OPS) or not (set(branch_ops) & set(WEIGHTED_OPS)):
            return None  # two computed values added (a box decode, BERT's word + position embeddings): no shortcut
        return NotRemovable(node_key(merge), names,
                            f"projection shortcut: the skip path computes ({', '.join(skip_ops) or 'ops'})")
    down = index.descendants(entry.name, limit=index.position[id(merge)])
    _, up = index.ancestors(branch_out.name)
    branch = [n for n in index.nodes if id(n) in down and id(n) in up]
    if not any(has_learned_weight(index, n) for n in branch):
        return None  # x + c*x^3 (tanh-GELU) and other weight-free arithmetic: no residual block
    found = Residual(merge, names, entry, branch_out, branch)
    found.problem = _problem(index, found)
    return found


def has_learned_weight(index: GraphIndex, node: gs.Node) -> bool:
    """``node`` is a weighted op (Conv, MatMul, Gemm, Einsum, ...) with an operand that is an initializer, a
    Constant or computed from constants only (not on the data path), or a control-flow node whose subgraphs
    hold one."""
    if node.op in WEIGHTED_OPS and any(t.name and not index.is_data(t) for t in node.inputs):
        return True
    return any(_sub_has_weight(sub) for _, sub in subgraphs(node))


def _sub_has_weight(graph: gs.Graph) -> bool:
    """A control-flow subgraph holds a weighted op reading a constant (its own or the outer scope's)."""
    for n in graph.nodes:
        if n.op in WEIGHTED_OPS and any(isinstance(t, gs.Constant) for t in n.inputs):
            return True
        if any(_sub_has_weight(sub) for _, sub in subgraphs(n)):
            return True
    return False


def _problem(index: GraphIndex, r: Residual) -> str | None:
    out = r.merge.outputs[0]
    if shape_of(r.entry) is None or shape_of(out) is None:
        return "shape unknown after shape inference"
    if not same_shape(r.entry, out) or dtype_of(r.entry) != dtype_of(out):
        return f"shape change: entry {list(shape_of(r.entry))} vs exit {list(shape_of(out))}"
    members = {id(n) for n in r.branch} | {id(r.merge)}
    for n in r.branch:  # single exit: nothing outside the block may read a branch tensor
        for t in n.outputs:
            if t.name in index.output_names:
                return f"branch tensor {t.name} is a graph output"
            if any(id(c) not in members for c in t.outputs):
                return f"branch tensor {t.name} is read outside the block"
    return None


def build_block(index: GraphIndex, r: Residual, ctx: MergeContext) -> Block:
    """The Block of a removable Residual: branch, merge, and the post-merge nodes the rules claim."""
    after, exit_t = extend(ctx)
    nodes = r.branch + [r.merge] + after
    produced = {t.name for n in nodes for t in n.outputs}
    side: list[str] = []
    for n in nodes:
        for t in index.inputs_of(n):
            if index.is_data(t) and t.name != r.entry.name and t.name not in produced and t.name not in side:
                side.append(t.name)
    return Block(id=exit_t.name, entry=r.entry.name, exit=exit_t.name, merge=node_key(r.merge),
                 nodes=tuple(node_key(n) for n in nodes), side_inputs=tuple(side),
                 shape=shape_of(r.entry), dtype=dtype_of(r.entry), position=index.position[id(r.merge)])


def _path_ops(index: GraphIndex, common: set[str], a: gs.Tensor, b: gs.Tensor) -> tuple[list[str], list[str]]:
    """Op types on the shorter operand path from the latest common ancestor (the skip path's ops), and on the
    longer one (the branch's)."""
    latest = max(common, key=lambda name: index.position.get(id(index.producer.get(name)), -1)
                 if name in index.producer else -1)
    down = index.descendants(latest)
    paths = []
    for t in (a, b):
        _, up = index.ancestors(t.name)
        paths.append([n.op for n in index.nodes if id(n) in up and id(n) in down])
    skip, branch = sorted(paths, key=len)
    return skip, branch
