"""Real or realistic raw inputs found on this machine, for the third-party model corpus (tools/data/real_models.py).

Each maker returns raw material (PIL images, byte strings, waveforms, sentences); the per-model preprocessing that
turns it into model input lives in tools/data/real_models.py, next to the registry entry it belongs to. Everything is
deterministic for a given seed and nothing is downloaded:

* text: words and sentences from documentation on disk (/usr/share/common-licenses, /usr/share/doc, this repo's
  README.md as a last resort);
* text images: lines, pages and captcha-like images rendered with Pillow (DejaVu fonts when installed, else
  Pillow's built-in font);
* files: real files under /usr/share, /usr/lib/python3*, /etc (the file-type classifier's inputs);
* audio: speech-like synthetic waveforms (voiced syllables with formants, pauses, noise, tones), 16 kHz float32;
* Fashion-MNIST images (Debian package dataset-fashion-mnist) for the ImageNet-shaped classifiers.
"""
from __future__ import annotations

import glob
import gzip
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype", "/usr/share/fonts")
_TEXT_GLOBS = ("/usr/share/common-licenses/*", "/usr/share/doc/*/README*", "/usr/share/doc/*/*.md",
               "/usr/share/doc/*/*.txt")
_FILE_ROOTS = ("/usr/share/doc", "/usr/share/common-licenses", "/usr/share/fonts", "/usr/share/pixmaps",
               "/usr/share/icons", "/usr/lib/python3*", "/usr/share/zoneinfo", "/etc", "/usr/bin",
               "/usr/share/datasets", "/usr/share/mime", "/usr/share/X11")
AUDIO_RATE = 16000


# ------------------------------------------------------------------------------------------------ text


def _read_text(path: str, limit: int = 200_000) -> str:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read(limit)
        else:
            with open(path, "rb") as f:
                data = f.read(limit)
    except OSError:
        return ""
    return data.decode("utf-8", errors="ignore")


@lru_cache(maxsize=1)
def _doc_texts() -> tuple[str, ...]:
    paths = sorted({p for g in _TEXT_GLOBS for p in glob.glob(g) if os.path.isfile(p)})
    texts = [_read_text(p) for p in paths[:400]]
    texts.append(_read_text(str(REPO / "README.md")))
    return tuple(t for t in texts if t)


def sentences(n: int, seed: int, min_chars: int = 30, max_chars: int = 220) -> list[str]:
    """n distinct English sentences from documentation on disk, in a seeded random order."""
    pool: list[str] = []
    seen: set[str] = set()
    for text in _doc_texts():
        text = re.sub(r"[`*#|<>_=\[\]{}]+", " ", text)
        for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
            s = s.strip()
            letters = sum(c.isalpha() for c in s)
            if min_chars <= len(s) <= max_chars and letters > 0.7 * len(s) and s not in seen:
                seen.add(s)
                pool.append(s)
    if len(pool) < n:
        raise RuntimeError(f"only {len(pool)} sentences found on disk, {n} wanted")
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.permutation(len(pool))[:n]]


@lru_cache(maxsize=1)
def _words() -> tuple[str, ...]:
    words = set()
    for text in _doc_texts():
        words.update(w for w in re.findall(r"[A-Za-z][A-Za-z0-9'-]{1,14}", text))
    return tuple(sorted(words))


def text_lines(n: int, seed: int, min_words: int = 1, max_words: int = 4) -> list[str]:
    """n short lines of words (and the odd number) from documentation on disk."""
    words = _words()
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        k = int(rng.integers(min_words, max_words + 1))
        parts = [words[int(rng.integers(len(words)))] for _ in range(k)]
        if rng.random() < 0.25:
            parts.append(str(int(rng.integers(0, 10_000))))
        lines.append(" ".join(parts))
    return lines


# ------------------------------------------------------------------------------------------------ images


@lru_cache(maxsize=1)
def _font_files() -> tuple[str, ...]:
    for d in _FONT_DIRS:
        found = sorted(glob.glob(os.path.join(d, "**", "*.ttf"), recursive=True))
        if found:
            return tuple(f for f in found if "Oblique" not in f and "Italic" not in f) or tuple(found)
    return ()


def font(size: int, index: int = 0):
    """A TrueType font of `size` px (DejaVu when installed), else Pillow's built-in font."""
    from PIL import ImageFont

    files = _font_files()
    if files:
        return ImageFont.truetype(files[index % len(files)], size)
    return ImageFont.load_default(size=size)


def render_line(text: str, height: int, rng: np.random.Generator, rotate180: bool = False):
    """A cropped text-line image (RGB, dark text on a light background), about `height` px high."""
    from PIL import Image, ImageDraw

    f = font(int(height * rng.uniform(0.6, 0.8)), int(rng.integers(8)))
    x0, y0, x1, y1 = f.getbbox(text)
    pad = int(height * 0.15)
    w, h = x1 - x0 + 2 * pad, y1 - y0 + 2 * pad
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 70, 3))
    img = Image.new("RGB", (w, h), bg)
    ImageDraw.Draw(img).text((pad - x0, pad - y0), text, font=f, fill=fg)
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 6, (h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img.rotate(180) if rotate180 else img


def render_page(size: tuple[int, int], rng: np.random.Generator, n_lines: int = 8):
    """A document-like RGB page (w, h) with `n_lines` text lines at random places and sizes."""
    from PIL import Image, ImageDraw

    w, h = size
    bg = tuple(int(v) for v in rng.integers(215, 256, 3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    lines = text_lines(n_lines, int(rng.integers(1 << 30)), 1, 5)
    y = int(rng.integers(5, 30))
    for line in lines:
        size_px = int(rng.integers(16, 40))
        f = font(size_px, int(rng.integers(8)))
        x = int(rng.integers(5, max(6, w // 4)))
        draw.text((x, y), line, font=f, fill=tuple(int(v) for v in rng.integers(0, 90, 3)))
        y += int(size_px * rng.uniform(1.3, 2.2))
        if y > h - 20:
            break
    arr = np.asarray(img).astype(np.float32) + rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


CAPTCHA_CHARS = "abcdefghijkmnpqrstuvwxyz23456789ABCDEFGHJKLMNPQRSTUVWXYZ"


def render_captcha(size: tuple[int, int], rng: np.random.Generator, n_chars: int | None = None,
                   scatter: bool = False) -> tuple[object, str]:
    """A captcha-like RGB image (w, h): coloured, jittered characters over noise lines and dots.

    scatter=True places a few large characters anywhere in the image (a click captcha, the detector's input).
    Returns (image, text).
    """
    from PIL import Image, ImageDraw

    w, h = size
    k = n_chars or int(rng.integers(4, 7))
    text = "".join(CAPTCHA_CHARS[int(i)] for i in rng.integers(0, len(CAPTCHA_CHARS), k))
    base = rng.integers(150, 256, 3)
    grad = np.linspace(0, 1, w)[None, :, None] * rng.integers(-60, 60, 3)[None, None, :]
    arr = np.clip(np.broadcast_to(base, (h, w, 3)) + grad, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        draw.line([tuple(int(v) for v in (rng.integers(0, w), rng.integers(0, h))) for _ in range(2)],
                  fill=tuple(int(v) for v in rng.integers(0, 200, 3)), width=int(rng.integers(1, 3)))
    for i, ch in enumerate(text):
        size_px = int(h * (rng.uniform(0.25, 0.4) if scatter else rng.uniform(0.55, 0.8)))
        f = font(size_px, int(rng.integers(8)))
        glyph = Image.new("RGBA", (size_px * 2, size_px * 2), (0, 0, 0, 0))
        ImageDraw.Draw(glyph).text((size_px // 2, size_px // 3), ch, font=f,
                                   fill=tuple(int(v) for v in rng.integers(0, 140, 3)) + (255,))
        glyph = glyph.rotate(float(rng.uniform(-30, 30)), resample=Image.BILINEAR)
        if scatter:
            x, y = int(rng.integers(0, max(1, w - size_px * 2))), int(rng.integers(0, max(1, h - size_px * 2)))
        else:
            x = int(i * (w - size_px) / max(1, k - 1) * 0.9 + rng.integers(-3, 4))
            y = int(rng.integers(-size_px // 3, max(1, h - size_px * 2 + size_px // 2)))
        img.paste(glyph, (x, y), glyph)
    for _ in range(int(w * h / 150)):
        draw.point((int(rng.integers(w)), int(rng.integers(h))), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img, text


def fashion_mnist(n: int, seed: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """n Fashion-MNIST images (uint8 (n, 28, 28)) and labels, seeded choice (tools.data.fmnist)."""
    from tools.data.fmnist import load_fmnist

    x, y = load_fmnist(split)
    idx = np.random.default_rng(seed).choice(len(x), n, replace=False)
    return x[idx], y[idx]


# ------------------------------------------------------------------------------------------------ files


def disk_files(n: int, seed: int, min_size: int = 8) -> list[str]:
    """n real regular files from system folders (documentation, licences, fonts, icons, Python sources, configs,
    binaries), seeded choice; a mix of many content types."""
    by_ext: dict[str, list[str]] = {}
    for root_glob in _FILE_ROOTS:
        for root in sorted(glob.glob(root_glob)):
            count = 0
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for fn in sorted(filenames):
                    p = os.path.join(dirpath, fn)
                    if not os.path.isfile(p) or os.path.islink(p):
                        continue
                    try:
                        if os.path.getsize(p) < min_size or not os.access(p, os.R_OK):
                            continue
                    except OSError:
                        continue
                    ext = os.path.splitext(fn)[1].lower() or os.path.basename(root)
                    by_ext.setdefault(ext, []).append(p)
                    count += 1
                if count > 4000:
                    break
    rng = np.random.default_rng(seed)
    # balance over extensions: round-robin over a shuffled list of extensions
    exts = sorted(by_ext)
    rng.shuffle(exts)
    for e in exts:
        rng.shuffle(by_ext[e])
    picked: list[str] = []
    depth = 0
    while len(picked) < n:
        added = False
        for e in exts:
            if depth < len(by_ext[e]):
                picked.append(by_ext[e][depth])
                added = True
                if len(picked) == n:
                    break
        if not added:
            break
        depth += 1
    return picked


# ------------------------------------------------------------------------------------------------ audio


def speech_like(seconds: float, rng: np.random.Generator, rate: int = AUDIO_RATE) -> np.ndarray:
    """A float32 waveform in [-1, 1]: voiced syllables (glottal pulse train at 90-250 Hz through two or three
    formant resonances, syllable-rate envelope) separated by pauses, plus background noise and the odd tone.
    About half of the time is speech-like."""
    n = int(seconds * rate)
    out = rng.normal(0, 10 ** rng.uniform(-3.5, -2.3), n)
    t = 0
    while t < n:
        pause = int(rate * rng.uniform(0.15, 0.9))
        t += pause
        if t >= n:
            break
        length = min(n - t, int(rate * rng.uniform(0.4, 1.6)))
        f0 = rng.uniform(90, 250) * (1 + 0.1 * np.sin(np.linspace(0, rng.uniform(2, 8), length)))
        phase = 2 * np.pi * np.cumsum(f0) / rate
        source = np.zeros(length)
        for h in range(1, 30):
            source += np.sin(h * phase) / h
        spec = np.fft.rfft(source)
        freqs = np.fft.rfftfreq(length, 1 / rate)
        gain = np.zeros_like(freqs)
        for fc, bw in zip(rng.uniform([300, 900, 2200], [900, 2300, 3200]), rng.uniform(60, 200, 3)):
            gain += 1.0 / (1.0 + ((freqs - fc) / bw) ** 2)
        voiced = np.fft.irfft(spec * gain, length)
        syl = rng.uniform(3, 6)
        env = np.clip(np.sin(np.pi * syl * np.arange(length) / rate) ** 2, 0, 1)
        voiced *= env * 0.3 / (np.abs(voiced).max() + 1e-9)
        out[t : t + length] += voiced
        t += length
    if rng.random() < 0.3:
        k = int(rate * rng.uniform(0.3, 1.0))
        s = int(rng.integers(0, max(1, n - k)))
        out[s : s + k] += 0.1 * np.sin(2 * np.pi * rng.uniform(300, 3000) * np.arange(k) / rate)
    return np.clip(out, -1, 1).astype(np.float32)
