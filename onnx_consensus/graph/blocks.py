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

from .ir import GraphIndex, dtype_of, node_key, shape_of, subgraphs, to_gs

MERGE_OPS = ("Add", "Sum")
# Operators after the merge that belong to the block (ResNet's ReLU: exact to drop when the entry is
# already non-negative, as it is after the previous block's ReLU).
POST_MERGE_OPS = ("Relu",)
# A normalisation after the merge belongs to the block when the entry comes out of the same kind of
# normalisation (post-LN transformers: LN(x + F(x)) with x an LN output); a final norm of a pre-LN network
# (whose entry is a residual sum) stays outside.
POST_MERGE_NORMS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
# Decomposed normalisation (ReduceMean/Sub/Pow/Sqrt/Div, RMS: Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul, ...).
DECOMPOSED_NORM_OPS = ("ReduceMean", "Sub", "Pow", "Mul", "Add", "Sqrt", "Div", "Reciprocal", "Cast")
ATTENTION_OPS = ("Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention",
                 "PackedMultiHeadAttention", "DecoderMaskedMultiHeadAttention")
# onnxruntime transformer-optimizer ops that hide a residual merge inside them: seen, not removed.
FUSED_MERGE_OPS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SkipGroupNorm",
                   "EmbedLayerNormalization")
UNITS = ("block", "layer")
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
    """blocks: the candidates; not_removable: merges seen but not removable, with reasons; notes: things
    seen about the model as a whole (fused ops, KV cache); refusal: set when the model is left alone as a
    whole (e.g. KV-cache inputs/outputs), then ``blocks`` is empty."""

    blocks: list[Block] = field(default_factory=list)
    not_removable: list[NotRemovable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    refusal: str | None = None
    unit: str = "block"

    def by_id(self) -> dict[str, Block]:
        return {b.id: b for b in self.blocks}


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
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    graph = model if isinstance(model, gs.Graph) else to_gs(model)
    if macs_per_node is None and isinstance(model, onnx.ModelProto):
        try:
            from .flops import count_cost

            macs_per_node = count_cost(model).macs_per_node
        except Exception:  # MACs are informative; detection must not depend on them
            macs_per_node = {}
    index = GraphIndex(graph)
    report = BlockReport(unit=unit)
    kv = _kv_cache(index)
    if kv:
        report.refusal = (f"the model carries a KV cache ({kv}): removing a layer would change its inputs and "
                          f"outputs, so it is left alone; export it without the cache (no past/present tensors)")
        report.notes.append(report.refusal)
        return report
    norms = _Norms(index)
    entries = _residual_entries(index)
    for node in index.nodes:
        if node.op in FUSED_MERGE_OPS:
            report.not_removable.append(NotRemovable(
                node_key(node), tuple(t.name for t in node.inputs[:2] if t.name),
                f"fused {node.op} ({node.domain or 'ai.onnx'}): onnxruntime's transformer optimizer fused the "
                f"residual merge with the following norm; removing the sub-block would need this node rewritten "
                f"into a plain norm, which is not done: prune the unoptimised export, then optimise"))
            continue
        if node.op not in MERGE_OPS:
            continue
        found = _match_residual(index, node, norms, entries)
        if isinstance(found, NotRemovable):
            report.not_removable.append(found)
        elif found is not None:
            report.blocks.append(found)
    report.notes.extend(_fused_notes(index))
    report.blocks = _innermost(report.blocks, report.not_removable)
    report.not_removable.extend(_subgraph_blocks(index))
    if unit == "layer":
        report.blocks = _pair_layers(index, report.blocks)
    report.blocks = _assign_stages(report.blocks, macs_per_node or {})
    return report


def _subgraph_blocks(index: GraphIndex) -> list[NotRemovable]:
    """Residual blocks inside control-flow subgraphs (If branches, Loop and Scan bodies), reported as not
    removable: they run a data-dependent number of times or only on one path, so they are left alone."""
    found = []
    for node in index.nodes:
        for attr, sub in subgraphs(node):
            for b in find_blocks(sub, macs_per_node={}).blocks:
                found.append(NotRemovable(b.merge, (b.entry, b.exit),
                                          f"inside the {attr} subgraph of {node.op} node {node.name or node_key(node)}: "
                                          "blocks in control-flow subgraphs are left alone"))
    return found


KV_NAME = ("past", "present", "cache")


def _kv_cache(index: GraphIndex) -> str | None:
    """Names of the KV-cache tensors of the interface, if any: an input that reaches an output through a
    Concat (the cache append), or inputs and outputs named past*/present*/*cache*."""
    graph = index.graph
    ins = [t for t in graph.inputs]
    outs = [t for t in graph.outputs]
    named = [t.name for t in ins + outs if any(k in t.name.lower() for k in KV_NAME)]
    if any(k in n.lower() for n in named for k in ("past", "cache")) and \
            any(k in t.name.lower() for t in outs for k in ("present", "cache")):
        return ", ".join(named[:4]) + (" ..." if len(named) > 4 else "")
    in_names = {t.name for t in ins}
    hits = []
    for out in outs:
        node = index.producer.get(out.name)
        hops = 0
        while node is not None and node.op in ("Identity", "Transpose", "Reshape", "Cast") and hops < 4:
            node = index.producer.get(node.inputs[0].name)
            hops += 1
        if node is None or node.op != "Concat":
            continue
        for t in node.inputs:
            src = t.name
            for _ in range(4):
                if src in in_names:
                    hits.append(f"{src} -> {out.name}")
                    break
                p = index.producer.get(src)
                if p is None or p.op not in ("Identity", "Transpose", "Reshape", "Cast"):
                    break
                src = p.inputs[0].name
    return ", ".join(hits[:4]) if hits else None


def _fused_notes(index: GraphIndex) -> list[str]:
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


class _Norms:
    """Normalisation recognition: single ops (LayerNormalization, RMSNormalization, ...) and decomposed
    forms (ReduceMean/Sub/Pow/Add/Sqrt/Div [+ Mul/Add affine], RMS: Pow/ReduceMean/Add/Sqrt/Div or
    Reciprocal/Mul), found from the tensor they normalise."""

    def __init__(self, index: GraphIndex):
        self.index = index
        self.decomposed: dict[str, tuple[list[gs.Node], gs.Tensor]] = {}
        for n in index.nodes:
            if n.op == "ReduceMean" and n.inputs and index.is_data(n.inputs[0]):
                start = n.inputs[0]
                if start.name not in self.decomposed:
                    found = self._decomposed_from(start)
                    if found is not None:
                        self.decomposed[start.name] = found
                # RMS / LN variants where ReduceMean reads Pow(x) or Mul(x, x): the start is x
                p = index.producer.get(start.name)
                if p is not None and p.op in ("Pow", "Mul") and p.inputs and p.inputs[0].name not in self.decomposed:
                    found = self._decomposed_from(p.inputs[0])
                    if found is not None:
                        self.decomposed[p.inputs[0].name] = found
        self.outputs = {t.name for n in index.nodes if n.op in POST_MERGE_NORMS for t in n.outputs[:1]}
        self.outputs |= {end.name for _, end in self.decomposed.values()}

    def after(self, t: gs.Tensor) -> tuple[list[gs.Node], gs.Tensor] | None:
        """The normalisation applied to ``t`` (nodes, output), when ``t`` feeds only that norm."""
        index = self.index
        if len(t.outputs) == 1 and t.outputs[0].op in POST_MERGE_NORMS:
            node = t.outputs[0]
            live = [o for o in node.outputs if o.outputs or o.name in index.output_names]
            if len(live) == 1 and live[0] is node.outputs[0]:
                return [node], node.outputs[0]
            return None
        return self.decomposed.get(t.name)

    def _decomposed_from(self, t: gs.Tensor):
        index = self.index
        if t.name in index.output_names:
            return None
        start = index.position[id(index.producer[t.name])] if t.name in index.producer else -1
        region: list[gs.Node] = []
        ids: set[int] = set()
        produced = {t.name}
        for node in index.nodes[start + 1:start + 80]:
            data_in = [x for x in node.inputs if index.is_data(x)]
            if not data_in or not all(x.name in produced for x in data_in):
                continue
            if node.op not in DECOMPOSED_NORM_OPS:
                return None  # something else reads the normalised tensor's intermediates
            region.append(node)
            ids.add(id(node))
            produced.update(o.name for o in node.outputs)
            open_ = [name for name in produced if name == t.name and any(id(c) not in ids for c in index.consumers(name))
                     or name != t.name and (name in index.output_names
                                            or any(id(c) not in ids for c in index.consumers(name)))]
            ops = {n.op for n in region}
            if len(open_) == 1 and open_[0] != t.name and "ReduceMean" in ops and ops & {"Sqrt", "Reciprocal"} \
                    and any(c.name == t.name for n in region for c in n.inputs) \
                    and not any(id(c) not in ids for c in index.consumers(t.name)):
                end = index.tensors[open_[0]]
                # a trailing affine (Mul by a weight, Add of a bias) belongs to the norm
                while len(end.outputs) == 1 and end.name not in index.output_names:
                    nxt = end.outputs[0]
                    if nxt.op not in ("Mul", "Add") or sum(index.is_data(x) for x in nxt.inputs) != 1:
                        break
                    region.append(nxt)
                    end = nxt.outputs[0]
                if shape_of(end) is not None and shape_of(t) is not None and not same_shape(end, t):
                    return None
                return region, end
            if len(region) > 16:
                return None
        return None


def _residual_entries(index: GraphIndex) -> set[str]:
    """Skip operands (entries) of every residual merge: an Add/Sum operand that is an ancestor of the other."""
    entries = set()
    for node in index.nodes:
        if node.op not in MERGE_OPS or len(node.inputs) != 2 or not all(index.is_data(t) for t in node.inputs):
            continue
        a, b = node.inputs
        if a.name == b.name:
            continue
        if a.name in index.ancestors(b.name)[0]:
            entries.add(a.name)
        elif b.name in index.ancestors(a.name)[0]:
            entries.add(b.name)
    return entries


def _pair_layers(index: GraphIndex, blocks: list[Block]) -> list[Block]:
    """Merge each attention sub-block with the sub-block that directly follows it (its exit is the other's
    entry) into one whole-layer Block; the layer's id is the second sub-block's exit."""
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


def _match_residual(index: GraphIndex, merge: gs.Node, norms: "_Norms | None" = None,
                    entries: set[str] | None = None) -> Block | NotRemovable | None:
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
    norms = norms or _Norms(index)
    entries = entries if entries is not None else _residual_entries(index)
    while exit_t.name not in index.output_names:
        # Post-LN: a normalisation after the merge belongs to the block when the entry is itself a norm
        # output (LN(x + F(x)) with x = LN(...)) or when the norm's output is the entry of a further
        # residual merge (the first layer, whose input is an embedding sum). A pre-LN network's final norm
        # (entry: a residual sum; output: the head) stays outside.
        norm = norms.after(exit_t)
        if norm is not None:
            norm_nodes, norm_out = norm
            if (entry.name in norms.outputs or norm_out.name in entries) and same_shape(norm_out, out):
                nodes.extend(norm_nodes)
                exit_t = norm_out
                continue
            break
        if len(exit_t.outputs) != 1:
            break
        nxt = exit_t.outputs[0]
        if nxt.op not in POST_MERGE_OPS or not same_shape(nxt.outputs[0], out) or len(
                [t for t in nxt.outputs if t.outputs or t.name in index.output_names]) != 1:
            break
        nodes.append(nxt)
        exit_t = nxt.outputs[0]
    produced = {t.name for n in nodes for t in n.outputs}
    side = []
    for n in nodes:
        for t in index.inputs_of(n):
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
    down = index.descendants(latest)
    paths = []
    for t in (a, b):
        _, up = index.ancestors(t.name)
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
