"""Fashion-MNIST loader and conversion to the (N, 3, 32, 32) input of the CIFAR-style reference ResNets.

The IDX .gz files come from the Debian package ``dataset-fashion-mnist``
(/usr/share/datasets/fashion-mnist/). Nothing is downloaded.

Usage (from the repository root)::

    python -m tools.data.fmnist calib examples/fmnist_calib --n 512 --seed 0
    python -m tools.data.fmnist eval /tmp/fmnist_eval            # all 10,000 test images
"""
from __future__ import annotations

import argparse
import gzip
import os
import struct
from pathlib import Path

import numpy as np

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
MEAN = 0.2860
STD = 0.3530
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPES = {0x08: np.uint8}


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (magic: two zero bytes, dtype code, number of dims; big-endian dims)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {data[:4]!r})")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unsupported IDX dtype code 0x{dtype_code:02x}")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 0
    if len(data) - offset != count:
        raise ValueError(f"{path}: expected {count} bytes of data for shape {dims}, got {len(data) - offset}")
    return np.frombuffer(data, dtype=_IDX_DTYPES[dtype_code], offset=offset).reshape(dims).copy()


def load_fmnist(split: str, root: str | os.PathLike = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, 28, 28), labels int64 (N,)) for split "train" (60,000) or "test" (10,000)."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    img_path, lbl_path = (root / name for name in _FILES[split])
    missing = [str(p) for p in (img_path, lbl_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST file(s) not found: {', '.join(missing)}. "
            "Install them with `apt-get install dataset-fashion-mnist` "
            f"(files go to {DEFAULT_ROOT}), or pass root= pointing at a directory holding the IDX .gz files."
        )
    images = _read_idx(img_path)
    labels = _read_idx(lbl_path).astype(np.int64)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path}: expected images of shape (N, 28, 28), got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{lbl_path}: {labels.shape[0]} labels for {images.shape[0]} images")
    return images, labels


def to_cifar_input(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 3, 32, 32).

    Zero-pads the raw image by 2 pixels per side (so the border equals the normalised background,
    (0 - MEAN) / STD), scales to [0, 1], normalises with MEAN/STD and replicates grey to 3 channels.
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"expected images of shape (N, 28, 28), got {images.shape}")
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)), mode="constant", constant_values=0)
    x = (padded.astype(np.float32) / np.float32(255.0) - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(np.repeat(x[:, None, :, :], 3, axis=1), dtype=np.float32)


def _write_set(out_dir: str | os.PathLike, x: np.ndarray, y: np.ndarray) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    xp, yp = out / "calib.npy", out / "labels.npy"
    np.save(xp, x.astype(np.float32, copy=False))
    np.save(yp, y.astype(np.int64, copy=False))
    return xp, yp


def make_calibration_set(
    out_dir: str | os.PathLike, n: int = 512, seed: int = 0, root: str | os.PathLike = DEFAULT_ROOT
) -> tuple[Path, Path]:
    """Write out_dir/calib.npy ((n, 3, 32, 32) float32) and out_dir/labels.npy ((n,) int64).

    The n images are drawn without replacement from the TRAINING split with numpy's
    default_rng(seed), in the drawn order.
    """
    images, labels = load_fmnist("train", root)
    if not 0 < n <= len(images):
        raise ValueError(f"n must be in 1..{len(images)}, got {n}")
    idx = np.random.default_rng(seed).choice(len(images), size=n, replace=False)
    return _write_set(out_dir, to_cifar_input(images[idx]), labels[idx])


def make_eval_set(
    out_dir: str | os.PathLike, n: int | None = None, root: str | os.PathLike = DEFAULT_ROOT
) -> tuple[Path, Path]:
    """Write the first n (default: all 10,000) TEST images as out_dir/calib.npy + out_dir/labels.npy."""
    images, labels = load_fmnist("test", root)
    if n is not None:
        if not 0 < n <= len(images):
            raise ValueError(f"n must be in 1..{len(images)}, got {n}")
        images, labels = images[:n], labels[:n]
    return _write_set(out_dir, to_cifar_input(images), labels)


def write_pngs(out_dir: str | os.PathLike, split: str, n: int, root: str | os.PathLike = DEFAULT_ROOT) -> Path:
    """The first n images of ``split`` as 32x32 grey PNGs (raw pixels zero-padded by 2 per side, as
    ``to_cifar_input`` pads) named 00000.png..., and labels.npy in that order. Loaded with
    ``--mean 0.286 --std 0.353`` (grey replicated to 3 channels) they equal ``to_cifar_input`` exactly."""
    from PIL import Image

    images, labels = load_fmnist(split, root)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    padded = np.pad(images[:n], ((0, 0), (2, 2), (2, 2)), mode="constant", constant_values=0)
    for i, img in enumerate(padded):
        Image.fromarray(img, mode="L").save(out / f"{i:05d}.png", optimize=True)
    np.save(out / "labels.npy", labels[:n].astype(np.int64))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.data.fmnist", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calib", help="calibration set from the training split")
    c.add_argument("out_dir")
    c.add_argument("--n", type=int, default=512)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--root", default=DEFAULT_ROOT)
    e = sub.add_parser("eval", help="evaluation set from the test split")
    e.add_argument("out_dir")
    e.add_argument("--n", type=int, default=None)
    e.add_argument("--root", default=DEFAULT_ROOT)
    g = sub.add_parser("pngs", help="the first N images of a split as 32x32 PNGs + labels.npy")
    g.add_argument("out_dir")
    g.add_argument("--split", choices=("train", "test"), default="train")
    g.add_argument("--n", type=int, default=5000)
    g.add_argument("--root", default=DEFAULT_ROOT)
    args = p.parse_args(argv)
    if args.cmd == "pngs":
        print(f"wrote {write_pngs(args.out_dir, args.split, args.n, args.root)}")
        return 0
    if args.cmd == "calib":
        paths = make_calibration_set(args.out_dir, n=args.n, seed=args.seed, root=args.root)
    else:
        paths = make_eval_set(args.out_dir, n=args.n, root=args.root)
    for path in paths:
        arr = np.load(path)
        print(f"wrote {path} {arr.shape} {arr.dtype}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
