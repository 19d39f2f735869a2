"""Post-merge rules: which ops after a residual merge belong to the block, in a small registry.

A rule looks at the block's current exit tensor and either claims the nodes that follow it (returning them
and the new exit) or declines (None). ``extend`` applies the registered rules, in registration order, until
none claims more. Adding a rule is one decorated function::

    @post_merge_rule("clip")
    def clip(ctx: MergeContext, t: gs.Tensor) -> Claim | None:
        return sole_consumer(ctx, t, ("Clip",))
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from ..ir import GraphIndex
from .norms import Norm, Norms
from .shapes import same_shape

Claim = tuple[list[gs.Node], gs.Tensor]  # (nodes joining the block, the block's new exit)


@dataclass(frozen=True)
class MergeContext:
    """What a rule may look at. entry: the block's entry; merge_out: the merge's output; norms: every
    normalisation of the graph; entries: names of the skip operands (entries) of every residual merge."""

    index: GraphIndex
    norms: Norms
    entries: frozenset[str]
    entry: gs.Tensor
    merge_out: gs.Tensor


Rule = Callable[[MergeContext, gs.Tensor], "Claim | None"]
POST_MERGE_RULES: dict[str, Rule] = {}


def post_merge_rule(name: str) -> Callable[[Rule], Rule]:
    """Register ``rule`` under ``name`` (tried after the rules registered before it)."""
    def register(rule: Rule) -> Rule:
        if name in POST_MERGE_RULES:
            raise ValueError(f"post-merge rule {name!r} is already registered")
        POST_MERGE_RULES[name] = rule
        return rule
    return register


def extend(ctx: MergeContext) -> Claim:
    """The nodes after the merge that belong to the block and the block's exit (the merge output when no
    rule claims anything). A graph output ends the block."""
    nodes: list[gs.Node] = []
    exit_t = ctx.merge_out
    while exit_t.name not in ctx.index.output_names:
        for rule in POST_MERGE_RULES.values():
            claim = rule(ctx, exit_t)
            if claim is not None and claim[1] is not exit_t:
                nodes.extend(claim[0])
                exit_t = claim[1]
                break
        else:
            break
    return nodes, exit_t


def sole_consumer(ctx: MergeContext, t: gs.Tensor, ops: tuple[str, ...]) -> Claim | None:
    """The one node reading ``t``, when its op is in ``ops``, it keeps the merge's shape and only its first
    output is used."""
    consumers = ctx.index.consumers(t.name)
    if len(consumers) != 1 or consumers[0].op not in ops:
        return None
    node = consumers[0]
    live = [o for o in node.outputs if o.outputs or o.name in ctx.index.output_names]
    if len(live) != 1 or live[0] is not node.outputs[0] or not same_shape(node.outputs[0], ctx.merge_out):
        return None
    return [node], node.outputs[0]


def _post_ln(ctx: MergeContext, norm: Norm | None) -> Claim | None:
    """Post-LN: a normalisation after the merge belongs to the block when the entry is itself a norm output
    (LN(x + F(x)) with x = LN(...)) or when the norm's output is the entry of a further residual merge (the
    first layer, whose input is an embedding sum). A pre-LN network's final norm (entry: a residual sum;
    output: the head) stays outside."""
    if norm is None:
        return None
    nodes, out = norm
    if (ctx.entry.name in ctx.norms.outputs or out.name in ctx.entries) and same_shape(out, ctx.merge_out):
        return nodes, out
    return None


@post_merge_rule("norm")
def single_op_norm(ctx: MergeContext, t: gs.Tensor) -> Claim | None:
    """LayerNormalization / RMSNormalization / SimplifiedLayerNormalization after the merge (post-LN)."""
    return _post_ln(ctx, ctx.norms.single_after(t))


@post_merge_rule("decomposed_norm")
def decomposed_norm(ctx: MergeContext, t: gs.Tensor) -> Claim | None:
    """A normalisation written as ReduceMean/Sub/Pow/Sqrt/Div (or RMS) ops after the merge (post-LN)."""
    return _post_ln(ctx, ctx.norms.decomposed_after(t))


@post_merge_rule("relu")
def relu(ctx: MergeContext, t: gs.Tensor) -> Claim | None:
    """ResNet's ReLU after the merge: exact to drop when the entry is already non-negative, as it is after
    the previous block's ReLU."""
    return sole_consumer(ctx, t, ("Relu",))
