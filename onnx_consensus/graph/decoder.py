"""Decoder layers of LLM exports that carry a KV cache, found on the graph's structure.

Two forms of the residual stream are recognised (both as exported by the common tools):

* ``plain`` (optimum ``text-generation-with-past``, torch exporters): each layer is
  ``h = h + attn(norm(h)); h = h + mlp(norm(h))`` with decomposed norms and attention; every residual merge
  is an ``Add`` whose one operand (the skip, possibly through a ``Cast``/``Identity``) is the stream and whose
  other operand (the branch) depends on it.
* ``fused`` (onnxruntime-genai model builder, onnxruntime's transformer optimizer): the merges are fused with
  the following norm into ``Skip*LayerNormalization`` nodes, ``(out, _, _, sum) = SkipNorm(residual, branch,
  gamma)``; ``sum`` (output 3) carries the stream, ``out`` feeds the next branch, and the first layer's input
  norm is a plain ``*LayerNormalization`` of the embeddings.

The stream is followed backwards from the logits; a merge whose branch newly reads KV-cache inputs opens a
layer (its attention), the merges after it up to the next such merge close it. Each layer owns the cache
inputs its attention reads (``past_key_values.i.key/value``) and the outputs it writes (``present.i.*``).
Caches are paired by their names' layer number (the convention of both exporters), and each pair is checked
structurally (the present output depends on the past input). Node and tensor names are otherwise not read.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import InputError
from .blocks import Block
from .ir import GraphIndex, dtype_of, node_key, shape_of, to_gs
from .kv_dims import symbolic_cache_dims

PLAIN, FUSED = "plain", "fused"
SKIP_NORMS = ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization")
NORMS = ("SimplifiedLayerNormalization", "LayerNormalization", "RMSNormalization")
PASS_OPS = ("Cast", "Identity")  # value-preserving hops on the stream (the exporters' fp32 casts in norms)
# Operators whose output does not depend on the values of their input: a path through them does not make
# a node part of a layer (the causal mask reads Shape(past_key_values.0.key), shared by every layer).
SHAPE_ONLY = ("Shape", "Size")
_NUM = re.compile(r"(\d+)")


@dataclass(frozen=True)
class CacheNames:
    """The KV-cache naming of a model: ``past % i`` / ``present % i`` templates per cache kind.

    templates: ((past_template, present_template), ...) e.g. (("past_key_values.%d.key", "present.%d.key"),
    ("past_key_values.%d.value", "present.%d.value")); n_layers: the number of cache numbers 0..n-1.
    """

    templates: tuple[tuple[str, str], ...]
    n_layers: int

    def past(self, i: int) -> tuple[str, ...]:
        return tuple(p % i for p, _ in self.templates)

    def present(self, i: int) -> tuple[str, ...]:
        return tuple(q % i for _, q in self.templates)


@dataclass(frozen=True)
class DecoderLayer:
    """One decoder layer: a removable ``Block`` plus the KV-cache tensors it owns.

    index: the layer's cache number (0-based, as in ``past_key_values.<index>.key``).
    block: entry = the residual stream into the layer (hidden states, (batch, seq, hidden) float), exit =
    the stream out of it; merge = the node key of its last residual merge. In the fused form the exit of the
    last layer is output 3 (``sum``) of the final Skip-norm, which the exporter may leave unnamed: call
    ``expose_residual_sums`` first (``find_decoder_layers`` reports the name it would get).
    past / present: cache input / output names owned by the layer, in template order (key, value).
    norm_in / norm_out (fused form): keys of the node normalising the layer's input (the previous layer's
    closing Skip-norm, or the embeddings' norm) and of the Skip-norm merging the layer's last branch (whose
    gamma is the next layer's input norm, or the final norm).
    """

    index: int
    block: Block
    past: tuple[str, ...]
    present: tuple[str, ...]
    form: str
    norm_in: str | None = None
    norm_out: str | None = None

    def to_json(self) -> dict:
        d = self.block.to_json()
        d.update(index=self.index, past=list(self.past), present=list(self.present), form=self.form,
                 norm_in=self.norm_in, norm_out=self.norm_out)
        return d


@dataclass
class DecoderReport:
    """layers: in stack order; form: PLAIN or FUSED; cache: the cache naming; notes: what was seen."""

    layers: list[DecoderLayer]
    form: str
    cache: CacheNames
    notes: list[str] = field(default_factory=list)

    @property
    def blocks(self) -> list[Block]:
        return [layer.block for layer in self.layers]

    def by_index(self) -> dict[int, DecoderLayer]:
        return {layer.index: layer for layer in self.layers}

    def by_id(self) -> dict[str, DecoderLayer]:
        return {layer.block.id: layer for layer in self.layers}


# ---------------------------------------------------------------- the cache

def cache_names(model: onnx.ModelProto | gs.Graph) -> CacheNames | None:
    """The KV-cache naming of ``model``'s interface, or None when it has no cache.

    Inputs and outputs whose names differ only by one number are grouped into templates; an input template
    and an output template with the same text after the number (``.key``) and the same numbers 0..n-1 form a
    cache pair. At least one pair is needed.
    """
    ins = [t.name for t in (model.graph.input if isinstance(model, onnx.ModelProto) else model.inputs)]
    outs = [t.name for t in (model.graph.output if isinstance(model, onnx.ModelProto) else model.outputs)]
    tin, tout = _templates(ins), _templates(outs)
    pairs = []
    for p, pnums in tin.items():
        for q, qnums in tout.items():
            if pnums == qnums and pnums == list(range(len(pnums))) and p.split("%d")[1] == q.split("%d")[1]:
                pairs.append((p, q, len(pnums)))
    if not pairs:
        return None
    counts = {n for *_, n in pairs}
    if len(counts) != 1:
        raise InputError(f"KV-cache tensors with different layer counts: {sorted(pairs)}")
    pairs.sort(key=lambda x: (0 if "key" in x[0].lower() else 1, x[0]))
    return CacheNames(tuple((p, q) for p, q, _ in pairs), counts.pop())


def _templates(names: Iterable[str]) -> dict[str, list[int]]:
    """Group names by the template obtained by replacing one number with %d (the last number that varies)."""
    groups: dict[str, list[int]] = {}
    for name in names:
        for m in _NUM.finditer(name):
            tpl = name[:m.start()].replace("%", "%%") + "%d" + name[m.end():].replace("%", "%%")
            groups.setdefault(tpl, []).append(int(m.group(1)))
    return {t: sorted(v) for t, v in groups.items() if len(v) >= 1 and len(set(v)) == len(v)}


# ---------------------------------------------------------------- detection

def find_decoder_layers(model: onnx.ModelProto | gs.Graph, *,
                        macs_per_node: dict[str, int | None] | None = None) -> DecoderReport:
    """The decoder layers of a model with a KV cache, in stack order.

    Raises InputError (one line) when the model has no KV cache, when the residual stream cannot be followed
    from the logits, or when the layers found do not match the cache numbers one to one.
    macs_per_node (node key -> MACs) fills ``Block.macs`` when given: MACs of a decoder depend on the
    sequence length, so count them for fixed shapes, e.g. ``flops.count_cost(model, {"input_ids": (1, 128),
    "attention_mask": (1, 128), "position_ids": (1, 128), "past_key_values.0.key": (1, 2, 0, 32), ...})``.
    """
    graph = model if isinstance(model, gs.Graph) else to_gs(model)
    cache = cache_names(graph)
    if cache is None:
        raise InputError("no KV cache found: expected inputs past*.N.* paired with outputs present*.N.*")
    index = GraphIndex(graph)
    names = {t.name for t in graph.inputs}
    for i in range(cache.n_layers):
        for p, q in zip(cache.past(i), cache.present(i)):
            if p not in names:
                raise InputError(f"KV-cache input {p} missing")
            if p not in index.ancestors(q)[0]:
                raise InputError(f"KV-cache output {q} does not depend on input {p}: not a cache pair")
    presents = {q for i in range(cache.n_layers) for q in cache.present(i)}
    heads = [t.name for t in graph.outputs if t.name not in presents]
    if not heads:
        raise InputError("the model has no output besides its KV cache")
    merges, form = _stream(index, "logits" if "logits" in heads else heads[0])
    layers = _group_layers(index, merges, form, cache, macs_per_node or {})
    notes = [f"{form} residual stream ({'Add + norm' if form == PLAIN else 'fused Skip*LayerNormalization'}), "
             f"{len(layers)} decoder layers, cache {', '.join(p for p, _ in cache.templates)}"]
    return DecoderReport(layers, form, cache, notes)


@dataclass
class _Merge:
    """A residual merge on the stream: node, the stream tensor it reads (skip), its branch operand, and the
    stream tensor it writes (fused: output 3, possibly not yet named; plain: the Add's output)."""

    node: gs.Node
    skip: str
    branch: str
    out: str


def _stream(index: GraphIndex, logits: str) -> tuple[list[_Merge], str]:
    """The residual merges from the first layer to the last, following the stream back from ``logits``
    (the model's output that is not a cache)."""
    # The last merge: the nearest Skip-norm or residual Add upstream of the logits (breadth first).
    start, seen, frontier = None, set(), [logits]
    while frontier and start is None:
        nxt = []
        for name in frontier:
            node = index.producer.get(name)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op in SKIP_NORMS or (node.op == "Add" and _add_merge(index, node) is not None):
                start = node
                break
            nxt.extend(t.name for t in node.inputs if t.name and not isinstance(t, gs.Constant))
        frontier = nxt
    if start is None:
        raise InputError("no residual merge (Add or Skip*LayerNormalization) found upstream of the logits")
    form = FUSED if start.op in SKIP_NORMS else PLAIN
    merges: list[_Merge] = []
    node = start
    while node is not None:
        m = _fused_merge(index, node) if form == FUSED else _add_merge(index, node)
        if m is None:
            break
        merges.append(m)
        node = index.producer.get(_through(index, m.skip))
        if node is not None and form == FUSED and node.op not in SKIP_NORMS:
            break
        if node is not None and form == PLAIN and node.op != "Add":
            break
    merges.reverse()
    return merges, form


def _through(index: GraphIndex, name: str) -> str:
    """Back through value-preserving hops (Cast/Identity) to the tensor they start from."""
    for _ in range(8):
        node = index.producer.get(name)
        if node is None or node.op not in PASS_OPS:
            return name
        name = node.inputs[0].name
    return name


def _add_merge(index: GraphIndex, node: gs.Node) -> _Merge | None:
    """``node`` as a residual Add: one operand (the skip) is data the other operand depends on, same shape."""
    if node.op != "Add" or len(node.inputs) != 2 or not all(index.is_data(t) for t in node.inputs):
        return None
    a, b = node.inputs
    if shape_of(a) is not None and shape_of(b) is not None and shape_of(a) != shape_of(b):
        return None
    for skip, branch in ((a, b), (b, a)):
        anc = index.ancestors(branch.name)[0]
        if skip.name in anc and len(index.ancestors(branch.name)[1] - index.ancestors(skip.name)[1]) > 2:
            return _Merge(node, skip.name, branch.name, node.outputs[0].name)
    return None


def _fused_merge(index: GraphIndex, node: gs.Node) -> _Merge | None:
    """``node`` as a Skip-norm merging a branch into the stream: the branch operand depends on the other."""
    if node.op not in SKIP_NORMS or len(node.inputs) < 3:
        return None
    a, b = node.inputs[0], node.inputs[1]
    out = node.outputs[3].name if len(node.outputs) > 3 and node.outputs[3].name else residual_sum_name(node)
    for skip, branch in ((a, b), (b, a)):
        tensors, nodes = index.ancestors(branch.name)
        p = index.producer.get(skip.name)
        # output 3 of the previous Skip-norm is not itself read by the branch, its sibling output 0 is
        if skip.name in tensors or (p is not None and id(p) in nodes):
            return _Merge(node, skip.name, branch.name, out)
    return None


def residual_sum_name(node: gs.Node) -> str:
    """The name output 3 (input + skip sum) of a Skip-norm gets from ``expose_residual_sums`` when unnamed."""
    return f"{node.outputs[0].name}/residual_sum"


def _cache_reads(index: GraphIndex, tensor: str, cache_inputs: set[str]) -> set[str]:
    """Cache inputs ``tensor`` depends on through values (paths through Shape/Size do not count)."""
    found, seen, stack = set(), set(), [tensor]
    while stack:
        name = stack.pop()
        if name in cache_inputs:
            found.add(name)
            continue
        node = index.producer.get(name)
        if node is None or id(node) in seen or node.op in SHAPE_ONLY:
            continue
        seen.add(id(node))
        stack.extend(t.name for t in index.inputs_of(node) if t.name)
    return found


def _group_layers(index: GraphIndex, merges: list[_Merge], form: str, cache: CacheNames,
                  macs: dict[str, int | None]) -> list[DecoderLayer]:
    """Merges -> layers: a merge whose branch reads new cache inputs opens a layer."""
    layer_of_past = {p: i for i in range(cache.n_layers) for p in cache.past(i)}
    groups: list[tuple[int, list[_Merge]]] = []
    read: set[str] = set()
    for m in merges:
        new = _cache_reads(index, m.branch, set(layer_of_past)) - read
        if new:
            nums = {layer_of_past[p] for p in new}
            if len(nums) != 1:
                raise InputError(f"one residual branch reads the caches of several layers {sorted(nums)}")
            groups.append((nums.pop(), [m]))
            read |= new
        elif groups:
            groups[-1][1].append(m)
        # merges before the first attention (none in these exporters) are not part of a layer
    if [g[0] for g in groups] != list(range(cache.n_layers)):
        raise InputError(f"decoder layers found for caches {[g[0] for g in groups]}, expected 0..{cache.n_layers - 1}")
    layers = []
    for num, ms in groups:
        first, last = ms[0], ms[-1]
        entry, exit_ = first.skip, last.out
        past, present = cache.past(num), cache.present(num)
        norm_in = None
        sources = [entry, *past]
        if form == FUSED:
            norm_in = node_key(index.producer[entry]) if entry in index.producer and \
                index.producer[entry].op in SKIP_NORMS else _first_norm(index, first)
            if norm_in is None:
                raise InputError(f"no norm found opening the decoder layer at {entry}")
            sources.append(norm_in)  # the normalised input (output 0 of norm_in) feeds the first branch
        nodes = [n for n in _layer_nodes(index, sources, [last.node.outputs[0].name, *present], first, form)
                 if node_key(n) != norm_in]
        side = _side_inputs(index, nodes, set(sources))
        ref = index.tensors.get(entry)
        block = Block(id=exit_, entry=entry, exit=exit_, merge=node_key(last.node),
                      nodes=tuple(node_key(n) for n in nodes), side_inputs=side,
                      shape=shape_of(ref) if ref is not None else None,
                      dtype=dtype_of(ref) if ref is not None else None,
                      macs=_sum_known(macs.get(node_key(n)) for n in nodes),
                      stage=0, position=index.position[id(last.node)])
        layers.append(DecoderLayer(num, block, past, present, form, norm_in,
                                   node_key(last.node) if form == FUSED else None))
    return layers


def _sum_known(values) -> int | None:
    """Sum of the known values (None when none is known)."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _first_norm(index: GraphIndex, first: _Merge) -> str | None:
    """Fused form, first layer: the plain norm of the embeddings that feeds the first branch."""
    anc = index.ancestors(first.branch)[1]
    for c in index.consumers(first.skip):
        if c.op in NORMS and id(c) in anc:
            return node_key(c)
    return None


def _layer_nodes(index: GraphIndex, sources: list[str], sinks: list[str], first: _Merge,
                 form: str) -> list[gs.Node]:
    """Nodes downstream of the layer's entry or cache inputs (not through Shape) and upstream of its last
    merge or cache outputs, in topological order. Fused form: the norm that opens the layer is not included
    (it is the previous layer's merge)."""
    down: set[int] = set()
    stack = list(sources)
    while stack:
        for node in index.consumers(stack.pop()):
            if id(node) in down or node.op in SHAPE_ONLY:
                continue
            down.add(id(node))
            stack.extend(t.name for t in node.outputs)
    up: set[int] = set()
    for s in sinks:
        up |= index.ancestors(s)[1]
    keep = down & up
    if form == FUSED:
        p = index.producer.get(first.skip)
        if p is not None:
            keep.discard(id(p))
    return [n for n in index.nodes if id(n) in keep]


def _side_inputs(index: GraphIndex, nodes: list[gs.Node], own: set[str]) -> tuple[str, ...]:
    """Data tensors read by ``nodes`` produced outside them (masks, rotary tables), minus ``own``."""
    inside = {t.name for n in nodes for t in n.outputs}
    side = []
    for n in nodes:
        for t in n.inputs:
            if t.name and index.is_data(t) and t.name not in inside and t.name not in own and t.name not in side:
                side.append(t.name)
    return tuple(side)


# ---------------------------------------------------------------- helpers for runs

def expose_residual_sums(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose Skip-norms all name output 3 (the residual sum), so that every fused
    layer's exit is a tensor (the final norm usually leaves it out); names from ``residual_sum_name``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type in SKIP_NORMS:
            while len(node.output) < 4:
                node.output.append("")
            if not node.output[3]:
                node.output[3] = f"{node.output[0]}/residual_sum"
    return out


def prefill_feed(model: onnx.ModelProto, input_ids: np.ndarray, *, past: int = 0) -> dict[str, np.ndarray]:
    """The inputs of a decoder export for ``input_ids`` (batch, seq) int64, as a prefill after ``past``
    cached positions: attention_mask of ones (batch, past + seq), position_ids past..past+seq-1 (when the
    model takes them), cache inputs zero-filled (batch, kv_heads, past, head_dim) in their declared dtype
    (past=0: the zero-length cache used for scoring). Symbolic cache dims are read by position: 0 batch,
    2 past length; a symbolic head count or head size from the graph (``kv_dims.symbolic_cache_dims``).
    Raises InputError for an input it cannot fill."""
    input_ids = np.asarray(input_ids)
    batch, seq = input_ids.shape
    inits = {i.name for i in model.graph.initializer}
    sized = symbolic_cache_dims(model)
    feed = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        name = vi.name
        if "input_ids" in name:
            feed[name] = input_ids.astype(dtype)
        elif "attention_mask" in name:
            feed[name] = np.ones((batch, past + seq), dtype)
        elif "position_ids" in name:
            feed[name] = np.tile(np.arange(past, past + seq), (batch, 1)).astype(dtype)
        elif len(dims) == 4:
            heads, head = sized.get(name, (dims[1], dims[3]))
            feed[name] = np.zeros((batch, heads, past, head), dtype)
        else:
            raise InputError(f"cannot build a value for input {name}")
    return feed


def dummy_feed(model: onnx.ModelProto, *, batch: int = 1, seq: int = 4, past: int = 0, seed: int = 0,
               vocab: int | None = None) -> dict[str, np.ndarray]:
    """``prefill_feed`` of random token ids in [0, vocab) (default [0, 2)), shape (batch, seq)."""
    ids = np.random.default_rng(seed).integers(0, vocab or 2, (batch, seq))
    return prefill_feed(model, ids, past=past)
