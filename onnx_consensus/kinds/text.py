"""Text kinds: DB text-segmentation maps and CTC sequences.

- ``text map`` (DB, PaddleOCR's detector): a probability map [N, 1, H, W] made by a Sigmoid (recognised from
  the graph: the output's producer, past shape-only ops, is a Sigmoid; rank 4, one channel, H and W >= 8 or
  unknown). Measure: both maps binarised at ``threshold`` (0.3, as PaddleOCR / rapidocr), mean per-sample
  mask IoU (1 when both masks are empty) as the value, and the number of text regions (connected
  components of the mask, ``scipy.ndimage.label``) of the original and the pruned model; damage
  (1 - IoU) + mean absolute change of the map.
- ``ctc`` (a recogniser's [N, T, C] class scores per time step; only by ``--task ocr`` or --output-kind:
  the graph does not tell a CTC output from a token classifier): greedy decode (argmax per step, repeats
  collapsed, the blank ``blank`` (default 0) dropped); value the share of samples whose decoded string
  equals the original's, also the character error rate (edit distance / original length); damage
  (1 - equal share) + CER.
"""
from __future__ import annotations

import numpy as np

from ..graph.heads import SHAPE_ONLY_OPS, producer_through
from .measures import HeadResult, Measure
from .registry import Head, KindSpec, RecogniseContext, register_kind, register_recogniser

DB_THRESHOLD = 0.3
MIN_MAP_SIDE = 8


def _threshold_arg(text: str) -> tuple:
    if not text:
        return ()
    t = float(text)
    if not 0 < t < 1:
        raise ValueError(f"threshold {t} is not in (0, 1)")
    return (("threshold", t),)


def _blank_arg(text: str) -> tuple:
    return (("blank", int(text)),) if text else ()


def regions(mask: np.ndarray) -> int:
    """Connected components (8-connected) of a 2-D bool mask."""
    from scipy import ndimage

    return int(ndimage.label(mask, structure=np.ones((3, 3)))[1])


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


class TextMapMeasure(Measure):
    """Mask IoU and region counts of a thresholded probability map (module docstring)."""

    def __init__(self, head):
        super().__init__(head)
        self.iou = self.abs = 0.0
        self.regions_ref = self.regions_out = 0

    def add(self, ref, out) -> None:
        name = self.head.outputs[0]
        t = self.head.arg("threshold") or DB_THRESHOLD
        r, o = np.asarray(ref[name]), np.asarray(out[name])
        for k in range(len(r)):
            mr, mo = r[k].reshape(-1, r.shape[-1]) > t, o[k].reshape(-1, o.shape[-1]) > t
            self.iou += mask_iou(mr, mo)
            self.regions_ref += regions(mr)
            self.regions_out += regions(mo)
            self.abs += float(np.abs(o[k].astype(np.float64) - r[k]).mean())
        self.n += len(r)

    def result(self) -> HeadResult:
        n = max(self.n, 1)
        iou = self.iou / n
        t = self.head.arg("threshold") or DB_THRESHOLD
        return HeadResult(self.head.kind, self.head.outputs, "text-map IoU", iou, (1 - iou) + self.abs / n,
                          f"text-map IoU {iou:.4f} at {t}, text regions {self.regions_ref} -> {self.regions_out}",
                          0.5, None, {"mask_iou": iou, "regions_original": self.regions_ref,
                                      "regions_pruned": self.regions_out})


def ctc_decode(scores: np.ndarray, blank: int = 0) -> list[tuple[int, ...]]:
    """Greedy CTC decode of (N, T, C) scores: per sample the argmax per step, repeats collapsed, blanks dropped."""
    out = []
    for row in np.asarray(scores).argmax(-1):
        seq, prev = [], -1
        for c in row.tolist():
            if c != prev and c != blank:
                seq.append(c)
            prev = c
        out.append(tuple(seq))
    return out


def edit_distance(a, b) -> int:
    """Levenshtein distance of two sequences."""
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[-1]


class CTCMeasure(Measure):
    """Equal decoded strings and character error rate (module docstring)."""

    def __init__(self, head):
        super().__init__(head)
        self.equal = self.edits = self.chars = 0

    def add(self, ref, out) -> None:
        name = self.head.outputs[0]
        blank = self.head.arg("blank") or 0
        for a, b in zip(ctc_decode(ref[name], blank), ctc_decode(out[name], blank)):
            self.equal += a == b
            self.edits += edit_distance(a, b)
            self.chars += max(len(a), 1)
        self.n += len(ref[name])

    def result(self) -> HeadResult:
        equal = self.equal / max(self.n, 1)
        cer = self.edits / max(self.chars, 1)
        return HeadResult(self.head.kind, self.head.outputs, "strings equal", equal, (1 - equal) + cer,
                          f"strings equal {equal:.4f} ({self.equal} of {self.n}), character error rate {cer:.4f}",
                          0.5, None, {"strings_equal": equal, "char_error_rate": cer})


register_kind(KindSpec("text map", "text-segmentation map (DB)", "segment", TextMapMeasure, "bce", _threshold_arg),
              aliases=("db", "map", "segment"))
register_kind(KindSpec("ctc", "CTC sequence", "ocr", CTCMeasure, "kl", _blank_arg), aliases=("ocr",))


def text_map_heads(ctx: RecogniseContext, by_shape: bool = False) -> list[Head]:
    """Sigmoid-made one-channel rank-4 maps among the free outputs (any rank-4 one-channel map with
    ``by_shape``)."""
    heads = []
    for name in ctx.free:
        shape = ctx.shape(name)
        if shape is None or len(shape) != 4 or shape[1] != 1:
            continue
        if any(isinstance(d, int) and 0 < d < MIN_MAP_SIDE for d in shape[2:]):
            continue
        made = producer_through(ctx.index, name, SHAPE_ONLY_OPS)
        sigmoid = made is not None and made.op == "Sigmoid"
        if sigmoid or by_shape:
            heads.append(Head("text map", (name,), (), "graph" if sigmoid else "shape"))
    return heads


@register_recogniser("text_map", priority=20)
def recognise_text_maps(ctx: RecogniseContext) -> list[Head]:
    return text_map_heads(ctx)


def ctc_head(ctx: RecogniseContext) -> list[Head]:
    """--task ocr: the first free rank-3 output (unknown rank counts) is the CTC sequence."""
    for name in ctx.free:
        shape = ctx.shape(name)
        if shape is None or len(shape) == 3:
            return [Head("ctc", (name,), (), "--task")]
    return []
