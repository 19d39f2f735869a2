"""The basic kinds (class scores, embedding, generic) and --task's choice of kinds.

Class scores: walking back from the output through shape-only ops, a constant bias or scale and
Softmax/LogSoftmax (``graph.heads.walk_back``) reaches a Softmax/LogSoftmax or a Gemm/MatMul/Conv with a
constant weight, and the output is (N, C) or (N, T, C) with C >= 2. An output made by a weighted layer
WITHOUT a softmax is a regression, not class scores, when (a) another float output of the model is made by
a Softmax/LogSoftmax (a face detector's scores beside its boxes and landmarks), or (b) its name says so
(box, bbox, landmark, loc, kps, keypoint, coord, offset, regress). Any other rank-2 float output with more
than one column is an "embedding"; the rest are "generic".
"""
from __future__ import annotations

import re

from ..errors import InputError
from ..graph.heads import SHAPE_ONLY_OPS, class_shape_ok, producer_through, score_form, walk_back
from .measures import ChannelMeasure, ClassMeasure, EmbeddingMeasure
from .registry import Head, KindSpec, RecogniseContext, register_kind, register_recogniser

CLASS_SCORES = "class scores"
REGRESSION_NAMES = re.compile(r"box|bbox|landmark|loc|kps|keypoint|coord|offset|regress", re.I)

register_kind(KindSpec(CLASS_SCORES, "class scores", "classify", ClassMeasure, "kl"),
              aliases=("class", "classify", "classes"))
register_kind(KindSpec("embedding", "embedding", "embed", EmbeddingMeasure, "cosine"),
              aliases=("embed",))
register_kind(KindSpec("generic", "values (regression, states)", "generic", ChannelMeasure, "channel_mse"), aliases=("regression",))
KIND_OF_TASK = {"classify": CLASS_SCORES, "embed": "embedding", "generic": "generic"}


def generic_head(ctx: RecogniseContext, name: str, source: str) -> Head:
    """A "generic" head; a rank-3 output made (past reshapes) by a Conv or a Concat along axis 1 is (N, C, L)
    channels first (a 1-D conv map, a detector tensor no recogniser claimed): its channel axis is 1, else the
    measure's default (``measures.channel_axis``)."""
    shape = ctx.shape(name)
    if shape is not None and len(shape) == 3:
        node = producer_through(ctx.index, name, tuple(o for o in SHAPE_ONLY_OPS if o != "Transpose"))
        if node is not None and (node.op == "Conv" or (node.op == "Concat" and node.attrs.get("axis") in (1, -2))):
            return Head("generic", (name,), (("channel_axis", 1),), source)
    return Head("generic", (name,), (), source)


def class_head(ctx: RecogniseContext, name: str, source: str) -> Head:
    return Head(CLASS_SCORES, (name,), (("form", score_form(ctx.index, name)),), source)


@register_recogniser("class_scores", priority=50)
def recognise_class_scores(ctx: RecogniseContext) -> list[Head]:
    """Class-score outputs (module docstring), regressions made by a weighted layer left to "generic"."""
    explicit = {n for n in ctx.outputs if walk_back(ctx.index, n, explicit=True)[0]}
    heads = []
    for name in list(ctx.free):
        scores, _ = walk_back(ctx.index, name)
        if not (scores and class_shape_ok(ctx.outputs[name])):
            continue
        siblings = [o for o in explicit - {name} if name not in ctx.index.ancestors(o)[0]]
        if name not in explicit and (siblings or REGRESSION_NAMES.search(name)):
            heads.append(generic_head(ctx, name, "graph"))  # boxes / landmarks from a Gemm: values
            continue
        heads.append(class_head(ctx, name, "graph"))
    return heads


@register_recogniser("embedding", priority=60)
def recognise_embedding(ctx: RecogniseContext) -> list[Head]:
    """Rank-2 outputs of more than one column that are no regression by name."""
    heads = []
    for name in list(ctx.free):
        shape = ctx.shape(name)
        if shape is not None and len(shape) == 2 and not (isinstance(shape[-1], int) and 0 < shape[-1] < 2) \
                and not REGRESSION_NAMES.search(name):
            heads.append(Head("embedding", (name,), (), "graph"))
    return heads


def task_heads(ctx: RecogniseContext) -> list[Head]:
    """The heads --task decides: the first float output's kind for classify / embed / generic; for detect,
    segment, ocr the heads of that family found from the graph, else from the shapes (InputError when no
    output fits)."""
    if not ctx.free:
        return []
    task = ctx.task
    first = ctx.free[0]
    if task == "classify":
        return [class_head(ctx, first, "--task")]
    if task == "generic":
        return [generic_head(ctx, first, "--task")]
    if task in KIND_OF_TASK:
        return [Head(KIND_OF_TASK[task], (first,), (), "--task")]
    from .detect import detector_heads
    from .text import ctc_head, text_map_heads

    found = {"detect": lambda: detector_heads(ctx, by_shape=True),
             "segment": lambda: text_map_heads(ctx, by_shape=True),
             "ocr": lambda: ctc_head(ctx)}[task]()
    if not found:
        shapes = ", ".join(f"{n} {list(ctx.shape(n)) if ctx.shape(n) is not None else '?'}" for n in ctx.free)
        raise InputError(f"--task {task}: no float output has a {task} layout ({shapes}); name it with "
                         "--output-kind NAME=KIND (e.g. output0=yolov8:80, boxes=boxes, scores=scores, map=db, "
                         "logits=ctc)")
    return [Head(h.kind, h.outputs, h.args, "--task") for h in found]
