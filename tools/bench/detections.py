"""The user's truth for detectors: raw outputs -> detections exactly as the deploying code decodes them, and
how many of the original model's detections a pruned model keeps. Independent of onnx_consensus (NumPy only).

Decoders (one per layout; each returns per image a ``Dets`` of boxes (k, 4) x1, y1, x2, y2 in input pixels,
scores (k,), classes (k,)):

* ``decode_yolov8``: Ultralytics YOLOv8/v11 export (N, 4 + C, A), boxes cx, cy, w, h; as
  ultralytics/utils/ops.py non_max_suppression with the predictor's defaults: confidence = max class score >
  conf (0.25), class-aware NMS (boxes offset by class x max_wh 7680) at IoU 0.7, at most 300 detections.
* ``decode_split``: boxes (N, A, 4) x1, y1, x2, y2 and scores (N, A, C) (YOLO-NAS / SSD-style export), same
  rule (max class score > conf, class-aware NMS), YOLO-NAS' defaults conf 0.25 / IoU 0.7.
* ``decode_yolox``: ddddocr's YOLOX head (raw grid offsets, objectness x class score > 0.1, NMS 0.45).

``detections_kept(original, pruned)``: the share of the original's detections matched by a pruned detection of
the same class at IoU >= 0.5 (greedy by score, one-to-one), over all images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_WH = 7680.0


@dataclass
class Dets:
    """boxes: float64 (k, 4) x1, y1, x2, y2 in input pixels; scores: (k,); classes: int64 (k,)."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (n, 4), b (m, 4) xyxy -> (n, m) IoU."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS (torchvision.ops.nms): indices kept, by descending score."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while len(order):
        i = order[0]
        keep.append(i)
        if len(order) == 1:
            break
        rest = order[1:]
        order = rest[iou_matrix(boxes[i:i + 1], boxes[rest])[0] <= iou]
    return np.array(keep, np.int64)


def _select(boxes: np.ndarray, cls_scores: np.ndarray, conf: float, iou: float, max_det: int) -> Dets:
    """boxes (A, 4) xyxy, cls_scores (A, C) -> Dets after confidence filter and class-aware NMS."""
    score, cls = cls_scores.max(1), cls_scores.argmax(1)
    m = score > conf
    boxes, score, cls = boxes[m].astype(np.float64), score[m].astype(np.float64), cls[m].astype(np.int64)
    keep = nms(boxes + (cls * MAX_WH)[:, None], score, iou)[:max_det]
    return Dets(boxes[keep], score[keep], cls[keep])


def decode_yolov8(out: np.ndarray, conf: float = 0.25, iou: float = 0.7, max_det: int = 300) -> list[Dets]:
    """out: (N, 4 + C, A) -> one Dets per image."""
    res = []
    for p in out:
        p = p.T.astype(np.float64)                   # (A, 4 + C)
        c, wh = p[:, :2], p[:, 2:4]
        res.append(_select(np.concatenate([c - wh / 2, c + wh / 2], 1), p[:, 4:], conf, iou, max_det))
    return res


def decode_split(boxes: np.ndarray, scores: np.ndarray, conf: float = 0.25, iou: float = 0.7,
                 max_det: int = 300) -> list[Dets]:
    """boxes (N, A, 4) xyxy, scores (N, A, C) -> one Dets per image."""
    return [_select(b, s, conf, iou, max_det) for b, s in zip(boxes, scores)]


def decode_yolox(out: np.ndarray, size: int = 416, conf: float = 0.1, iou: float = 0.45) -> list[Dets]:
    """ddddocr's YOLOX (demo_postprocess + multiclass_nms, one class): out (N, A, 5 + C) raw grid offsets."""
    grids, strides = [], []
    for s in (8, 16, 32):
        g = size // s
        yv, xv = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
        grids.append(np.stack((xv, yv), -1).reshape(-1, 2))
        strides.append(np.full((g * g, 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    res = []
    for p in out:
        p = p.reshape(-1, p.shape[-1]).astype(np.float64)
        xy, wh = (p[:, :2] + grid) * stride, np.exp(p[:, 2:4]) * stride
        cls_scores = p[:, 4:5] * p[:, 5:]
        res.append(_select(np.concatenate([xy - wh / 2, xy + wh / 2], 1), cls_scores, conf, iou, 10_000))
    return res


def match(a: Dets, b: Dets, iou: float = 0.5) -> int:
    """How many of a's detections b matches (same class, IoU >= iou), one-to-one, greedy by a's score."""
    if not len(a) or not len(b):
        return 0
    m = iou_matrix(a.boxes, b.boxes)
    m[a.classes[:, None] != b.classes[None, :]] = 0.0
    used = np.zeros(len(b), bool)
    hit = 0
    for i in np.argsort(-a.scores, kind="stable"):
        cand = np.where(~used & (m[i] >= iou))[0]
        if len(cand):
            used[cand[np.argmax(m[i, cand])]] = True
            hit += 1
    return hit


def detections_kept(original: list[Dets], pruned: list[Dets], iou: float = 0.5) -> float:
    """Share of the original's detections (all images) that the pruned model keeps; 1.0 when there are none."""
    total = sum(len(a) for a in original)
    return sum(match(a, b, iou) for a, b in zip(original, pruned)) / total if total else 1.0


def average_precision(dets: list[Dets], gt_boxes: list[np.ndarray], gt_classes: list[np.ndarray],
                      iou: float = 0.5) -> float:
    """mAP@iou over the classes present in the ground truth (VOC-style all-point interpolation)."""
    aps = []
    for c in sorted({int(x) for g in gt_classes for x in g}):
        recs = []
        n_gt = sum(int((g == c).sum()) for g in gt_classes)
        for d, gb, gc in zip(dets, gt_boxes, gt_classes):
            sel, g = d.classes == c, gb[gc == c]
            used = np.zeros(len(g), bool)
            for s, box in sorted(zip(d.scores[sel], d.boxes[sel]), key=lambda t: -t[0]):
                ok = False
                if len(g):
                    ious = iou_matrix(box[None], g)[0]
                    ious[used] = 0
                    j = int(np.argmax(ious))
                    if ious[j] >= iou:
                        used[j] = ok = True
                recs.append((s, ok))
        recs.sort(key=lambda t: -t[0])
        tp = np.cumsum([r[1] for r in recs]) if recs else np.zeros(0)
        prec = tp / np.arange(1, len(recs) + 1) if recs else np.zeros(0)
        rec = tp / max(n_gt, 1)
        mrec = np.concatenate([[0], rec, [1]])
        mpre = np.concatenate([[0], prec, [0]])
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        idx = np.where(mrec[1:] != mrec[:-1])[0]
        aps.append(float(((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]).sum()))
    return float(np.mean(aps)) if aps else 0.0


def db_regions(prob: np.ndarray, thresh: float = 0.3, min_pixels: int = 3) -> list[np.ndarray]:
    """A DB text map (H, W) -> its text regions: connected components (4-neighbour, scipy.ndimage.label) of the
    map binarised at rapidocr's thresh 0.3, each a boolean (H, W) mask, at least min_pixels pixels."""
    from scipy import ndimage

    lab, k = ndimage.label(prob > thresh)
    sizes = np.bincount(lab.ravel(), minlength=k + 1)
    return [lab == i for i in range(1, k + 1) if sizes[i] >= min_pixels]


def regions_kept(original: list[list[np.ndarray]], pruned: list[list[np.ndarray]], iou: float = 0.5) -> float:
    """Share of the original's text regions (all images) overlapped by a pruned region at mask IoU >= iou."""
    total = sum(len(a) for a in original)
    kept = sum(any((r & q).sum() / (r | q).sum() >= iou for q in b) for a, b in zip(original, pruned) for r in a)
    return kept / total if total else 1.0
