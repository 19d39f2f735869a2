"""Detector heads: recognised from the graph and the shapes, measured by the detections the pruned model keeps.

Layouts (reference.md, "Output layouts people deploy"):
- ``yolov8`` (also YOLOv11): one output [N, 4 + C (+ M mask coefficients), A]: cx, cy, w, h in pixels, then
  class probabilities, no objectness; args ``classes`` (default: channels - 4).
- ``yolov5`` (also YOLOv7, YOLOX decoded): [N, A, 5 + C]: cx, cy, w, h, objectness, class probabilities;
  confidence = objectness x class probability.
- ``yolov10``: [N, Q, 6]: x1, y1, x2, y2, score, class id, after the model's own NMS-free selection.
- ``yolox_raw``: YOLOX with decode_in_inference off, [N, A, 5 + C] of cell offsets and log sizes, decoded here
  with the stride-8/16/32 grid of the input (``size`` HxW; default the square input the anchor count fits).
  Recognised when the head has scores and a Concat but no decode arithmetic and A is the cell count of the
  model's static image input; else by --output-kind.
- ``boxes`` + ``scores`` (SSD-like, DETR-like): boxes [N, A, 4] and scores [N, A, C]; box ``format`` xyxy
  or cxcywh; score ``form``: probs (as given), sigmoid (of logits), logits (softmax, the last class dropped
  as "no object", as DETR does). Defaults: a Softmax/Sigmoid-made scores output is probs with xyxy boxes,
  else logits with cxcywh boxes (DETR).
Scores outside [0, 1] in a YOLO layout are taken as logits (a sigmoid applied).

Recognised from the graph (``recognise_detectors``): a rank-3 output made (past shape-only ops) by a Concat
(or a ScatterND slice assignment) whose nearest upstream nodes hold a Sigmoid/Softmax (the score branch) and
decode arithmetic (a Mul/Add/Sub/Div by a constant tensor:
grid and stride; or the DFL Softmax + Conv); then the layout from the shape ([N, K, A] with K < A: yolov8;
[N, A, K], K >= 6: yolov5, or yolov10 when K == 6 and a TopK selects the queries or A == 300). Two rank-3 outputs with
the same anchor axis, one of last size 4, pair as boxes + scores when the scores output is Softmax/Sigmoid
made or the names say box / score / logit. ``--task detect`` also takes those layouts from the shapes alone.

Measure (``DetectionMeasure``): decode, keep detections with confidence >= ``CONF`` (0.25, as Ultralytics),
class-aware NMS at IoU ``NMS_IOU`` (0.7 for yolov8 as Ultralytics, 0.45 for the others as YOLOv5), at most
``MAX_DET`` per sample; then each of the ORIGINAL's detections is matched, greedily by its confidence, to an
unmatched pruned detection of the same class with IoU >= ``MATCH_IOU`` (0.5). value: detections kept =
matched / original detections over the data (1.0 when the original detects nothing on any sample: said in
the text); damage: (1 - kept) + mean over samples of |change of the top confidence| (continuous, so blocks
that all keep every detection are still ordered). Under an explicit target, more than a tenth of the
original's detections lost (kept < ``COLLAPSE``, 0.9) is warned about as a collapse.
"""
from __future__ import annotations

import re

import numpy as np
import onnx_graphsurgeon as gs

from ..graph.heads import SHAPE_ONLY_OPS, producer_through
from .measures import HeadResult, Measure
from .registry import Head, KindSpec, RecogniseContext, register_kind, register_recogniser

YOLO_KINDS = ("yolov8", "yolov5", "yolov10", "yolox_raw")  # one tensor holding boxes and scores
CONF = 0.25
MATCH_IOU = 0.5
NMS_IOU = {"yolov8": 0.7}
DEFAULT_NMS_IOU = 0.45
MAX_DET = 300
PRE_NMS = 3000
COLLAPSE = 0.9  # more than a tenth of the original's detections lost is said as a collapse (issue 20's bar)
EVIDENCE_DEPTH = 12
BOX_NAMES = re.compile(r"box|loc|bbox", re.I)
SCORE_NAMES = re.compile(r"score|logit|conf|cls|class|prob", re.I)


def _int_arg(text: str) -> tuple:
    return (("classes", int(text)),) if text else ()


def _boxes_arg(text: str) -> tuple:
    if text and text not in ("xyxy", "cxcywh"):
        raise ValueError(f"box format {text!r} is not xyxy or cxcywh")
    return (("format", text),) if text else ()


def _scores_arg(text: str) -> tuple:
    if text and text not in ("probs", "sigmoid", "logits"):
        raise ValueError(f"score form {text!r} is not probs, sigmoid or logits")
    return (("form", text),) if text else ()


# ------------------------------------------------------------------------------------------------ geometry

def to_xyxy(boxes: np.ndarray, fmt: str) -> np.ndarray:
    """(k, 4) boxes in ``fmt`` (xyxy | cxcywh) -> xyxy float64."""
    b = np.asarray(boxes, np.float64)
    if fmt == "cxcywh":
        half = b[:, 2:4] / 2
        return np.concatenate([b[:, :2] - half, b[:, :2] + half], axis=1)
    return b


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU of xyxy boxes (degenerate boxes have area 0)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float, max_det: int = MAX_DET) -> np.ndarray:
    """Indices kept by greedy class-aware NMS (highest score first; a box suppresses the same class's boxes
    overlapping it by more than ``iou``), at most ``max_det``."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while len(order) and len(keep) < max_det:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        overlap = iou_matrix(boxes[i:i + 1], boxes[rest])[0]
        order = rest[(overlap <= iou) | (classes[rest] != classes[i])]
    return np.asarray(keep, dtype=np.int64)


def match(ref: tuple, out: tuple, iou: float = MATCH_IOU) -> tuple[int, list[float]]:
    """Match the original's detections ``ref`` (boxes, scores, classes) to ``out``'s: greedily by ref score,
    each to the unmatched same-class detection of highest IoU >= ``iou``. Returns (matched count, score
    changes out - ref of the matched)."""
    rb, rs, rc = ref
    ob, os_, oc = out
    if not len(rb) or not len(ob):
        return 0, []
    ious = iou_matrix(rb, ob)
    ious[rc[:, None] != oc[None, :]] = -1.0
    used = np.zeros(len(ob), bool)
    deltas = []
    for i in np.argsort(-rs, kind="stable"):
        cand = np.where(used, -1.0, ious[i])
        j = int(cand.argmax())
        if cand[j] >= iou:
            used[j] = True
            deltas.append(float(os_[j] - rs[i]))
    return len(deltas), deltas


# ------------------------------------------------------------------------------------------------ decode

def _sigmoid_if_logits(s: np.ndarray) -> np.ndarray:
    if s.size and (s.min() < 0 or s.max() > 1):
        return 1.0 / (1.0 + np.exp(-s))
    return s


def candidates(head: Head, arrays: dict, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample ``k``'s candidate detections before thresholding: (xyxy boxes (A, 4), confidence (A,), class
    (A,)), from the head's outputs ``arrays`` ({name: (N, ...)})."""
    kind = head.kind
    x = np.asarray(arrays[head.outputs[0]][k], np.float64)
    if kind == "yolov8":
        x = x.T  # (A, 4 + C + M)
        c = head.arg("classes") or x.shape[1] - 4
        scores = _sigmoid_if_logits(x[:, 4:4 + c])
        boxes = to_xyxy(x[:, :4], "cxcywh")
    elif kind == "yolov5":
        c = head.arg("classes") or x.shape[1] - 5
        scores = _sigmoid_if_logits(x[:, 4:5]) * _sigmoid_if_logits(x[:, 5:5 + c])
        boxes = to_xyxy(x[:, :4], "cxcywh")
    elif kind == "yolox_raw":
        grid, stride = yolox_grid(len(x), head.arg("size"))
        c = x.shape[1] - 5
        scores = _sigmoid_if_logits(x[:, 4:5]) * _sigmoid_if_logits(x[:, 5:5 + c])
        xy, wh = (x[:, :2] + grid) * stride, np.exp(np.clip(x[:, 2:4], None, 30)) * stride
        boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    elif kind == "yolov10":
        return to_xyxy(x[:, :4], "xyxy"), x[:, 4], np.rint(x[:, 5]).astype(np.int64)
    else:  # boxes + scores
        s = np.asarray(arrays[head.outputs[1]][k], np.float64)
        form = head.arg("form") or "probs"
        if form == "logits":
            z = np.exp(s - s.max(axis=-1, keepdims=True))
            s = (z / z.sum(axis=-1, keepdims=True))[:, :-1]
        elif form == "sigmoid":
            s = 1.0 / (1.0 + np.exp(-s))
        scores = s
        boxes = to_xyxy(x[:, :4], head.arg("format") or "xyxy")
    cls = scores.argmax(axis=1) if scores.shape[1] else np.zeros(len(scores), np.int64)
    conf = scores.max(axis=1) if scores.shape[1] else np.zeros(len(scores))
    return boxes, conf, cls


YOLOX_STRIDES = (8, 16, 32)


def yolox_grid(anchors: int, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The (A, 2) cell offsets (x, y) and (A, 1) strides of a raw YOLOX output (decode_in_inference off):
    one cell per stride-8/16/32 position of an input of ``size`` (H, W); default: the square input the anchor
    count fits. InputError when the count fits no such input."""
    from ..errors import InputError

    if size is None:
        side = int(round((anchors * 1024 / 21) ** 0.5))
        size = (side, side)
    grids, strides = [], []
    for s in YOLOX_STRIDES:
        h, w = size[0] // s, size[1] // s
        ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        grids.append(np.stack((xs, ys), -1).reshape(-1, 2))
        strides.append(np.full((h * w, 1), float(s)))
    grid = np.concatenate(grids)
    if len(grid) != anchors:
        raise InputError(f"a raw YOLOX output of {anchors} anchors fits no square input at strides 8/16/32: give the "
                         "input size, --output-kind NAME=yolox_raw:HxW")
    return grid.astype(np.float64), np.concatenate(strides)


def detections(head: Head, arrays: dict, k: int) -> tuple[tuple, float]:
    """Sample ``k``'s detections after the threshold and NMS: ((boxes, scores, classes), top confidence)."""
    boxes, conf, cls = candidates(head, arrays, k)
    top = float(conf.max()) if len(conf) else 0.0
    keep = np.where(conf >= CONF)[0]
    if len(keep) > PRE_NMS:
        keep = keep[np.argsort(-conf[keep], kind="stable")[:PRE_NMS]]
    boxes, conf, cls = boxes[keep], conf[keep], cls[keep]
    if head.kind != "yolov10":
        kept = nms(boxes, conf, cls, NMS_IOU.get(head.kind, DEFAULT_NMS_IOU))
        boxes, conf, cls = boxes[kept], conf[kept], cls[kept]
    return (boxes, conf, cls), top


class DetectionMeasure(Measure):
    """Detections kept, score change of the matched ones, top-confidence change (module docstring)."""

    def __init__(self, head):
        super().__init__(head)
        self.total = self.matched = self.found = 0
        self.delta = self.top = 0.0

    def add(self, ref, out) -> None:
        n = len(ref[self.head.outputs[0]])
        for k in range(n):
            r, rtop = detections(self.head, ref, k)
            o, otop = detections(self.head, out, k)
            hit, deltas = match(r, o)
            self.total += len(r[0])
            self.found += len(o[0])
            self.matched += hit
            self.delta += sum(deltas)
            self.top += abs(otop - rtop)
        self.n += n

    def blind_note(self) -> str | None:
        if not self.total:
            return (f"the original model detects nothing (confidence >= {CONF}) on these {self.n} hold-out samples: "
                    "detections kept is 1.0 whatever is removed")
        return None

    def result(self) -> HeadResult:
        kept = self.matched / self.total if self.total else 1.0
        change = self.delta / self.matched if self.matched else 0.0
        top = self.top / max(self.n, 1)
        details = {"detections_kept": kept, "matched": self.matched, "original_detections": self.total,
                   "pruned_detections": self.found, "score_change": change, "top_confidence_change": top}
        if self.total:
            text = (f"detections kept {kept:.2f} ({self.matched} of {self.total}), score change {change:+.2f}"
                    f" (confidence >= {CONF}, matched at IoU >= {MATCH_IOU}, same class)")
        else:
            text = (f"detections kept 1.00 by definition: the original detects nothing (confidence >= {CONF}) on "
                    f"these {self.n} samples; top-confidence change {top:.3f}")
        return HeadResult(self.head.kind, self.head.outputs, "detections kept", kept, (1.0 - kept) + top, text, COLLAPSE,
                          None if self.total else "the original model detects nothing on these samples", details)


for _name, _label, _parse, _aliases in (
        ("yolov8", "detections (YOLOv8/v11 layout [N, 4+C, A])", _int_arg, ("yolov11", "yolo11")),
        ("yolov5", "detections (YOLOv5/v7/YOLOX layout [N, A, 5+C])", _int_arg, ("yolov7", "yolox")),
        ("yolov10", "detections (YOLOv10 layout [N, Q, 6])", None, ())):
    register_kind(KindSpec(_name, _label, "detect", DetectionMeasure, "detection", _parse), aliases=_aliases)


def _size_arg(text: str) -> tuple:
    if not text:
        return ()
    h, _, w = text.partition("x")
    return (("size", (int(h), int(w or h))),)


register_kind(KindSpec("yolox_raw", "detections (raw YOLOX [N, A, 5+C], decoded here)", "detect", DetectionMeasure,
                       "detection", _size_arg), aliases=("yolox-raw",))
register_kind(KindSpec("boxes", "detections (separate boxes and scores)", "detect", DetectionMeasure, "detection",
                       _boxes_arg, outputs=2), aliases=("ssd", "detr"))
register_kind(KindSpec("scores", "detection scores (with a boxes output)", "detect", DetectionMeasure, "detection",
                       _scores_arg))


# ------------------------------------------------------------------------------------------------ recognise

def _constant_size(index, t: gs.Tensor) -> int:
    """Elements of a constant operand, 0 for data: an initializer, or the value of a Constant node (torch's
    exporter writes traced tensors such as anchor grids and strides that way)."""
    if isinstance(t, gs.Constant):
        return int(t.values.size)
    node = index.producer.get(t.name)
    value = node.attrs.get("value") if node is not None and node.op == "Constant" else None
    return int(value.values.size) if isinstance(value, gs.Constant) else 0


def _evidence(index, name: str) -> set[str]:
    """What the ``EVIDENCE_DEPTH`` levels of nodes upstream of tensor ``name`` hold: "score" (Sigmoid /
    Softmax), "concat", "decode" (arithmetic with a constant tensor of > 1 element, or a Conv after a
    Softmax: DFL), "topk"."""
    found: set[str] = set()
    frontier, seen = [name], set()
    for _ in range(EVIDENCE_DEPTH):
        nxt = []
        for t in frontier:
            node = index.producer.get(t)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op in ("Sigmoid", "Softmax"):
                found.add("score")
            elif node.op == "Concat":
                found.add("concat")
            elif node.op == "TopK":
                found.add("topk")
            elif node.op in ("Mul", "Add", "Sub", "Div") and any(_constant_size(index, i) > 1 for i in node.inputs):
                found.add("decode")
            elif node.op == "Conv" and any((p := index.producer.get(i.name)) is not None and p.op in
                                           ("Softmax", "Transpose", "Reshape") for i in node.inputs[:1]):
                found.add("decode")
            nxt += [i.name for i in node.inputs if index.is_data(i)]
        frontier = nxt
    return found


def _yolo_layout(ctx: RecogniseContext, name: str, graph_said: set[str]) -> Head | None:
    shape = ctx.shape(name)
    if shape is None or len(shape) != 3:
        return None
    d1, d2 = shape[1], shape[2]
    known1, known2 = isinstance(d1, int) and d1 > 0, isinstance(d2, int) and d2 > 0
    if known1 and d1 >= 5 and (not known2 or d1 < d2):
        return Head("yolov8", (name,), _sigmoid_classes(ctx, name), "graph" if graph_said else "shape")
    if known2 and d2 >= 6 and (not known1 or d2 < d1):
        kind = "yolov10" if d2 == 6 and ("topk" in graph_said or d1 == 300) else "yolov5"
        return Head(kind, (name,), (), "graph" if graph_said else "shape")
    return None


def _sigmoid_classes(ctx: RecogniseContext, name: str) -> tuple:
    """(("classes", C),) when the output is a Concat along axis 1 of a box part and a Sigmoid-made part of
    static size C (YOLOv8-seg adds mask coefficients after it), else ()."""
    node = producer_through(ctx.index, name, tuple(o for o in SHAPE_ONLY_OPS if o != "Transpose"))
    if node is None or node.op != "Concat" or node.attrs.get("axis") not in (1, -2):
        return ()
    for t in node.inputs[1:]:
        p = producer_through(ctx.index, t.name, SHAPE_ONLY_OPS)
        shape = getattr(t, "shape", None)
        if p is not None and p.op == "Sigmoid" and shape is not None and isinstance(shape[1], int):
            return (("classes", shape[1]),)
    return ()


def _pairs(ctx: RecogniseContext, by_shape: bool) -> list[Head]:
    """boxes + scores pairs among the free rank-3 outputs."""
    heads = []
    rank3 = [n for n in ctx.free if ctx.shape(n) is not None and len(ctx.shape(n)) == 3]
    for b in [n for n in rank3 if ctx.shape(n)[2] == 4]:
        for s in rank3:
            da, db = ctx.shape(s)[1], ctx.shape(b)[1]
            differ = isinstance(da, int) and isinstance(db, int) and da != db  # a symbolic anchor count may match
            if s == b or differ or any(b in h.outputs or s in h.outputs for h in heads):
                continue
            made = producer_through(ctx.index, s, SHAPE_ONLY_OPS)
            probs = made is not None and made.op in ("Softmax", "Sigmoid")
            box_made = producer_through(ctx.index, b, SHAPE_ONLY_OPS)
            if box_made is not None and box_made.op in ("Softmax", "LogSoftmax"):
                continue  # a distribution, not boxes
            named = BOX_NAMES.search(b) and SCORE_NAMES.search(s)
            if probs or named or by_shape:
                args = (("format", "xyxy"), ("form", "probs")) if probs else (("format", "cxcywh"), ("form", "logits"))
                heads.append(Head("boxes", (b, s), args, "graph" if (probs or named) else "shape"))
    return heads


def detector_heads(ctx: RecogniseContext, by_shape: bool = False) -> list[Head]:
    """Detector heads among the free outputs: from graph evidence (module docstring), or with ``by_shape``
    (--task detect) from the shapes alone."""
    heads = _pairs(ctx, by_shape)
    paired = {o for h in heads for o in h.outputs}
    for name in ctx.free:
        if name in paired:
            continue
        final = producer_through(ctx.index, name, SHAPE_ONLY_OPS)
        if not by_shape and (final is None or final.op not in ("Concat", "ScatterND")):
            continue  # the exporters end the head in the Concat (or slice assignment) of boxes and scores
        said = _evidence(ctx.index, name)
        if by_shape or {"score", "concat", "decode"} <= said or {"topk", "concat"} <= said:
            head = _yolo_layout(ctx, name, said if not by_shape or {"score", "concat"} <= said else set())
            if head is not None:
                heads.append(head)
        elif {"score", "concat"} <= said:
            head = _raw_yolox(ctx, name)
            if head is not None:
                heads.append(head)
    return heads


def _raw_yolox(ctx: RecogniseContext, name: str) -> Head | None:
    """A YOLOX head exported with decode_in_inference off: scores and a Concat but no decode arithmetic (a
    YOLOv5/v8 export always decodes in the graph), [N, A, 5 + C] with A the stride-8/16/32 cell count of the
    model's image input (N, C, H, W with static H, W)."""
    from ..errors import InputError

    shape = ctx.shape(name)
    if shape is None or len(shape) != 3 or not isinstance(shape[2], int) or shape[2] < 6:
        return None
    images = [t for t in getattr(ctx.graph, "inputs", []) if t.shape is not None and len(t.shape) == 4
              and all(isinstance(d, int) and d > 0 for d in t.shape[2:])]
    if len(images) != 1 or not isinstance(shape[1], int):
        return None
    size = tuple(images[0].shape[2:])
    try:
        yolox_grid(shape[1], size)
    except InputError:
        return None
    return Head("yolox_raw", (name,), (("size", size),), "graph")


@register_recogniser("detector", priority=10)
def recognise_detectors(ctx: RecogniseContext) -> list[Head]:
    return detector_heads(ctx)
