"""Removing decoder layers together with their KV cache (see ``decoder.py`` for how layers are found).

The interface changes, on purpose and only this way: the removed layers' cache inputs
(``past_key_values.i.*``) and outputs (``present.i.*``) are dropped and the remaining ones renumbered
0..n-1 in stack order, so the model stays loadable by runtimes that enumerate caches by number
(onnxruntime-genai's ``past_key_values.%d.key``). Every other input and output keeps its name, dtype and
shape.

* plain form (Add + norm): the consumers of a removed layer's exit read its entry (``surgery.rewire``).
* fused form (``Skip*LayerNormalization``): layer i is opened by a norm ``P`` (the previous layer's closing
  Skip-norm, or the embeddings' norm) and closed by a Skip-norm ``N`` that adds the layer's last branch and
  applies the next layer's input norm (or the final norm). Removing it: ``P`` takes ``N``'s gamma (and beta,
  epsilon), so the next layer reads norm_{i+1}(stream before layer i); readers of ``N``'s normalised output
  read ``P``'s, readers of ``N``'s sum (output 3) read ``P``'s sum (or the embeddings when ``P`` is the first
  norm). The layer's residual contribution disappears; the following norm keeps its weight.
* a removed layer's cache input read elsewhere by shape only (the causal mask reads
  ``Shape(past_key_values.0.key)``) is replaced there by the first kept layer's input of the same kind.

Export folders (configs, copying the folder, writing it) are ``llm.folder``'s.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx

from ..errors import InputError, TargetError
from .blocks import Block
from .decoder import FUSED, SKIP_NORMS, DecoderLayer, DecoderReport, find_decoder_layers
from .ir import node_key
from .proto_edit import drop_dead, outer_reads, rename, resolve, substitute_reads, toposorted


def remove_layers(model: onnx.ModelProto, layers: Iterable[int | DecoderLayer | Block], *,
                  report: DecoderReport | None = None) -> onnx.ModelProto:
    """A copy of ``model`` without the decoder ``layers`` and their caches. A layer is given by its cache
    number, its DecoderLayer, or its Block (``report.blocks``, matched by id, for callers that hold Blocks).

    report: ``find_decoder_layers(model)`` when already computed. Raises TargetError when every layer would
    go, InputError for an unknown layer number. The input model is not modified.
    """
    report = report or find_decoder_layers(model)
    by_index, by_id = report.by_index(), report.by_id()
    chosen = set()
    for x in layers:
        if isinstance(x, Block):
            if x.id not in by_id:
                raise InputError(f"block {x.id} is not a decoder layer of this model")
            chosen.add(by_id[x.id].index)
        else:
            chosen.add(x.index if isinstance(x, DecoderLayer) else int(x))
    chosen = sorted(chosen)
    for i in chosen:
        if i not in by_index:
            raise InputError(f"no decoder layer {i}: the model has layers 0..{len(by_index) - 1}")
    if not chosen:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out
    kept = [i for i in sorted(by_index) if i not in chosen]
    if not kept:
        raise TargetError("cannot remove every decoder layer")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    removed = [by_index[i] for i in chosen]
    subst: dict[str, str] = {}  # name -> the name its readers read instead
    if report.form == FUSED:
        _bypass_fused(graph, removed, subst)
    else:
        _bypass_plain(graph, [layer.block for layer in removed], subst)
    renames = _drop_caches(graph, report, chosen, kept, subst)
    substitute_reads(graph, subst)
    _outputs_through_identity(graph, subst)
    drop_dead(graph)
    rename(graph, renames)
    toposorted(graph)
    _restore_declarations(out, model, report, kept)
    return out


def _bypass_plain(graph: onnx.GraphProto, blocks: Sequence[Block], subst: dict[str, str]) -> None:
    """Plain form: the readers of each removed layer's exit read its entry (``surgery.rewire``'s rule, by
    name: a run of removed layers chains to the first one's entry)."""
    produced = {o for n in graph.node for o in n.output} | {v.name for v in graph.input}
    for block in blocks:
        if block.exit not in produced:
            raise InputError(f"block {block.id} is not in this graph")
        subst[block.exit] = block.entry


def _bypass_fused(graph: onnx.GraphProto, removed: Sequence[DecoderLayer], subst: dict[str, str]) -> None:
    """Fused form: give each removed layer's opening norm the closing Skip-norm's parameters and point the
    closing norm's readers at the opening norm's outputs (in stack order, so runs of removed layers chain)."""
    nodes = {node_key(n): n for n in graph.node}
    read = {x for n in graph.node for x in outer_reads(n)} | {o.name for o in graph.output}
    took_over: dict[str, onnx.NodeProto] = {}  # key of a bypassed closing norm -> node now doing its job
    for layer in sorted(removed, key=lambda x: x.index):
        p = took_over.get(layer.norm_in) or nodes.get(layer.norm_in)
        n = nodes.get(layer.norm_out)
        if p is None or n is None or n.op_type not in SKIP_NORMS:
            raise InputError(f"decoder layer {layer.index}: its fused norms were not found")
        # parameters: gamma (input 2 of a Skip-norm, 1 of a norm), beta after it where the op has one
        first = 2 if p.op_type in SKIP_NORMS else 1
        params = list(n.input[2:3])
        if p.op_type in ("LayerNormalization", "SkipLayerNormalization") and len(n.input) > 3:
            params.append(n.input[3])
        kept_inputs = list(p.input[:first]) + params
        del p.input[:]
        p.input.extend(kept_inputs)
        eps = [a for a in n.attribute if a.name == "epsilon"]
        if eps:
            for a in [a for a in p.attribute if a.name == "epsilon"]:
                p.attribute.remove(a)
            p.attribute.append(eps[0])
        if p.op_type in SKIP_NORMS:
            stream = p.output[3] if len(p.output) > 3 and p.output[3] else None
        else:
            stream = p.input[0]  # the embeddings' norm: the stream is its input
        subst[n.output[0]] = p.output[0]
        n_sum = n.output[3] if len(n.output) > 3 and n.output[3] else None
        if n_sum is not None and n_sum in read:
            if stream is None:
                raise InputError(f"decoder layer {layer.index}: no residual sum to hand on")
            subst[n_sum] = stream
        took_over[layer.norm_out] = p


def _outputs_through_identity(graph: onnx.GraphProto, subst: dict[str, str]) -> None:
    """A graph output whose readers were redirected keeps its name: Identity(substitute) produces it, and its
    old producer's output is renamed away (a dead node then, unless its other outputs are read)."""
    for o in graph.output:
        if o.name not in subst:
            continue
        for n in graph.node:
            for k, x in enumerate(n.output):
                if x == o.name:
                    n.output[k] = f"{o.name}/bypassed"
        source = resolve(o.name, subst)
        graph.node.append(onnx.helper.make_node("Identity", [source], [o.name], name=f"{o.name}/bypass"))


def _drop_caches(graph: onnx.GraphProto, report: DecoderReport, chosen: list[int], kept: list[int],
                 subst: dict[str, str]) -> dict[str, str]:
    """Remove the chosen layers' cache inputs/outputs; their readers (shape readers shared by all layers, the
    causal mask) read the first kept layer's. Returns the renames that number the kept ones 0..len(kept)-1
    (and move the dropped names out of the way)."""
    cache = report.cache
    first_kept = cache.past(kept[0])
    for i in chosen:
        for k, name in enumerate(cache.past(i)):
            subst[name] = first_kept[k]
    drop_in = {n for i in chosen for n in cache.past(i)}
    drop_out = {n for i in chosen for n in cache.present(i)}
    for fld, drop in ((graph.input, drop_in), (graph.output, drop_out)):
        for v in [v for v in fld if v.name in drop]:
            fld.remove(v)
    renames = {name: f"{name}/removed" for name in drop_in | drop_out}
    for new, old in enumerate(kept):
        renames.update(zip(cache.past(old), cache.past(new)))
        renames.update(zip(cache.present(old), cache.present(new)))
    return {a: b for a, b in renames.items() if a != b}


def _restore_declarations(out: onnx.ModelProto, model: onnx.ModelProto, report: DecoderReport,
                          kept: list[int]) -> None:
    """The original input/output declarations (dtypes, symbolic shapes), renamed for renumbered caches."""
    cache = report.cache
    back = {}
    for new, old in enumerate(kept):
        back.update(zip(cache.past(new), cache.past(old)))
        back.update(zip(cache.present(new), cache.present(old)))
    for fld in ("input", "output"):
        original = {v.name: v for v in getattr(model.graph, fld)}
        for v in getattr(out.graph, fld):
            src = original.get(back.get(v.name, v.name))
            if src is not None:
                name = v.name
                v.CopyFrom(src)
                v.name = name


def expected_interface(model: onnx.ModelProto, report: DecoderReport, layers: Iterable[int]) -> tuple[list, list]:
    """(input names, output names) the pruned model must have: the original's minus the removed caches,
    renumbered."""
    chosen = set(layers)
    n = report.cache.n_layers
    kept = [i for i in range(n) if i not in chosen]
    pasts = {p for i in range(n) for p in report.cache.past(i)}
    presents = {p for i in range(n) for p in report.cache.present(i)}
    ins = [v.name for v in model.graph.input if v.name not in pasts]
    outs = [v.name for v in model.graph.output if v.name not in presents]
    ins += [p for j in range(len(kept)) for p in report.cache.past(j)]
    outs += [p for j in range(len(kept)) for p in report.cache.present(j)]
    return ins, outs
