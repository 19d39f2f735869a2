"""Synthetic detection scenes of real Fashion-MNIST objects, and the Ultralytics letterbox that turns them into
detector input (the detectors of models/tiny_detector.py and their calibration / eval folders).

A scene is an RGB picture of a random size (about 100-200 px a side) with a cluttered background (colour
gradient, noise, lines, blobs) and 1-5 Fashion-MNIST items (28x28 photographs of clothes, shoes, bags; real
images, Debian package dataset-fashion-mnist) pasted at 22-56 px, tinted, blended by their own intensity;
each item's box is the tight box of its visible pixels, its class its Fashion-MNIST label.

``letterbox`` is Ultralytics' LetterBox(new_shape, auto=False, scaleup=True, center=True): resize keeping the
aspect ratio so the long side fits, bilinear (cv2.INTER_LINEAR; Pillow here, no cv2), pad to the square with
grey 114 split evenly on both sides; then RGB, HWC -> CHW, x / 255 (ultralytics/engine/predictor.py
preprocess). Boxes are mapped the same way (x * r + pad).

Everything is deterministic for a seed; training scenes take training images, calibration and eval scenes the
Fashion-MNIST test images (objects the detector never saw).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD_VALUE = 114


@dataclass
class Scene:
    """image: uint8 (H, W, 3) RGB; boxes: float32 (k, 4) x1, y1, x2, y2 in image pixels; classes: int64 (k,)."""

    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(40, 215, 3)
    gy = np.linspace(-1, 1, h)[:, None, None] * rng.uniform(-50, 50, 3)
    gx = np.linspace(-1, 1, w)[None, :, None] * rng.uniform(-50, 50, 3)
    img = base + gy + gx + rng.normal(0, rng.uniform(2, 7), (h, w, 3))
    for _ in range(int(rng.integers(0, 6))):  # clutter: lines and soft blobs
        if rng.random() < 0.5:
            y0, x0 = int(rng.integers(h)), int(rng.integers(w))
            t = int(rng.integers(1, 4))
            col = rng.uniform(0, 255, 3)
            if rng.random() < 0.5:
                img[y0:y0 + t, :] = col
            else:
                img[:, x0:x0 + t] = col
        else:
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(6, 25)
            yy, xx = np.mgrid[:h, :w]
            m = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
            img = img * (1 - 0.6 * m) + rng.uniform(0, 255, 3) * 0.6 * m
    return img


def _resize_grey(item: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(item).resize((size, size), Image.BILINEAR), np.float32)


def make_scene(rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, max_objects: int = 5) -> Scene:
    """One scene with 1..max_objects items drawn from items (uint8 (N, 28, 28)) and labels (N,)."""
    h, w = int(rng.integers(96, 200)), int(rng.integers(96, 200))
    img = _background(rng, h, w)
    boxes, classes, taken = [], [], np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(6):
            s = int(rng.integers(22, 57))
            if s >= min(h, w):
                continue
            y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
            if taken[y:y + s, x:x + s].mean() > 0.25:
                continue
            k = int(rng.integers(len(items)))
            alpha = _resize_grey(items[k], s) / 255.0
            ys, xs = np.nonzero(alpha > 0.12)
            if len(ys) < 10:
                continue
            tint = rng.uniform(0.3, 1.0, 3) * (255 if rng.random() < 0.7 else 60)
            a = alpha[..., None]
            region = img[y:y + s, x:x + s]
            img[y:y + s, x:x + s] = region * (1 - a) + tint * a
            taken[y:y + s, x:x + s] = True
            boxes.append([x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1])
            classes.append(int(labels[k]))
            break
    return Scene(np.clip(img, 0, 255).astype(np.uint8), np.array(boxes, np.float32).reshape(-1, 4),
                 np.array(classes, np.int64))


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Ultralytics LetterBox(auto=False, center=True) + predictor preprocess: uint8 (H, W, 3) RGB ->
    float32 (3, size, size) in [0, 1]; returns (input, ratio r, (pad_x, pad_y)) so that a box maps as
    x * r + pad_x, y * r + pad_y."""
    from PIL import Image

    h, w = image.shape[:2]
    r = min(size / h, size / w)
    nw, nh = int(round(w * r)), int(round(h * r))
    dw, dh = (size - nw) / 2, (size - nh) / 2
    left, top = int(round(dw - 0.1)), int(round(dh - 0.1))
    canvas = np.full((size, size, 3), PAD_VALUE, np.uint8)
    small = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    canvas[top:top + nh, left:left + nw] = small
    return np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0), r, (left, top)


def scene_batch(rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, n: int, size: int
                ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """n letterboxed scenes: float32 (n, 3, size, size), per scene boxes (k, 4) xyxy in input pixels, classes."""
    xs, boxes, classes = [], [], []
    for _ in range(n):
        sc = make_scene(rng, items, labels)
        x, r, (px, py) = letterbox(sc.image, size)
        xs.append(x)
        boxes.append((sc.boxes * r + np.array([px, py, px, py], np.float32)).astype(np.float32))
        classes.append(sc.classes)
    return np.stack(xs), boxes, classes
