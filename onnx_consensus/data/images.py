"""Image files as model input: decoding (Pillow), resizing, scaling and normalisation.

One image is one sample of a single 4-D model input (NCHW or NHWC): pixel value p (0..255) becomes
``(p * scale - mean[c]) / std[c]`` (float32) for a float input; an integer input gets the raw pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import InputError, ResourceLimitError
from ..graph.ir import TensorSpec
from ..graph.dtypes import is_float
from .formats import Corrupt, fmt_shape, is_int

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


@dataclass(frozen=True)
class ImageOptions:
    """How image files become model input.

    pixel value p (0..255) -> ``(p * scale - mean[c]) / std[c]`` for float model inputs; integer
    model inputs get the raw pixel values.

    Attributes:
        size: (H, W) to resize to (bilinear); default: the model input's static H, W.
        mean, std: per-channel (length C) or shared (length 1) normalisation, applied after ``scale``.
        layout: "NCHW" or "NHWC": where the channel dim of the model input is.
        channels: 1, 3 or 4; default: the model input's channel dim (grey images are replicated to
            3 channels, colour images converted to grey for 1 channel).
        scale: multiplier applied to raw 0..255 pixel values before mean/std.
    """

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    channels: int | None = None
    scale: float = 1.0 / 255.0


@dataclass(frozen=True)
class ImagePlan:
    height: int
    width: int
    channels: int
    layout: str
    mean: np.ndarray  # (C,) float32
    std: np.ndarray  # (C,) float32
    scale: float
    normalise: bool

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        if self.layout == "NCHW":
            return (self.channels, self.height, self.width)
        return (self.height, self.width, self.channels)


def import_pil():
    try:
        from PIL import Image  # noqa: PLC0415
    except ImportError as exc:
        raise InputError("image calibration files need Pillow, which is not installed: pip install pillow") from exc
    return Image


def image_plan(spec: TensorSpec, opts: ImageOptions) -> ImagePlan:
    if opts.layout not in ("NCHW", "NHWC"):
        raise InputError(f"image layout must be 'NCHW' or 'NHWC', got {opts.layout!r}")
    if spec.shape is not None and len(spec.shape) != 4:
        raise InputError(f"image files need a 4-D model input; input {spec.name!r} has shape {fmt_shape(spec.shape)}")
    if not (is_float(spec.dtype) or is_int(spec.dtype)):
        raise InputError(f"image files cannot feed model input {spec.name!r} of dtype {spec.dtype}")
    shape = spec.shape or (None, None, None, None)
    c_dim, h_dim, w_dim = (shape[1], shape[2], shape[3]) if opts.layout == "NCHW" else (shape[3], shape[1], shape[2])
    channels = opts.channels if opts.channels is not None else (c_dim if isinstance(c_dim, int) else 3)
    if channels not in (1, 3, 4):
        raise InputError(f"image channels must be 1, 3 or 4, got {channels} (model input {spec.name!r} {fmt_shape(spec.shape)}, layout {opts.layout})")
    if isinstance(c_dim, int) and c_dim != channels:
        raise InputError(f"images are read with {channels} channel(s) but model input {spec.name!r} has {c_dim} "
                         f"channels ({opts.layout}; check --layout)")
    if opts.size is not None:
        if len(opts.size) != 2 or any(int(s) <= 0 for s in opts.size):
            raise InputError(f"--image-size must be HxW with positive values, got {opts.size!r}")
        height, width = int(opts.size[0]), int(opts.size[1])
        for got, want, what in ((height, h_dim, "height"), (width, w_dim, "width")):
            if isinstance(want, int) and got != want:
                raise InputError(f"--image-size: image {what} {got} does not match model input {spec.name!r} "
                                 f"{fmt_shape(spec.shape)} ({opts.layout})")
    elif isinstance(h_dim, int) and isinstance(w_dim, int):
        height, width = h_dim, w_dim
    else:
        raise InputError(
            f"model input {spec.name!r} has dynamic image size {fmt_shape(spec.shape)}: give the size to resize "
            f"images to with --image-size HxW"
        )
    mean = np.asarray(opts.mean, dtype=np.float32).ravel()
    std = np.asarray(opts.std, dtype=np.float32).ravel()
    for arr, what in ((mean, "mean"), (std, "std")):
        if arr.size not in (1, channels):
            raise InputError(f"--{what} must have 1 or {channels} values, got {arr.size}")
    if np.any(std == 0):
        raise InputError("--std must not contain zeros")
    return ImagePlan(
        height, width, channels, opts.layout,
        np.broadcast_to(mean, (channels,)).copy(), np.broadcast_to(std, (channels,)).copy(),
        float(opts.scale), is_float(spec.dtype),
    )


def _open_bounded(Image, path: str):
    """``Image.open(path)`` (lazy: the header only), refused (ResourceLimitError) when the image has more pixels
    than Pillow's decompression-bomb limit ``Image.MAX_IMAGE_PIXELS`` (which Pillow itself only warns about
    up to twice that)."""
    import warnings

    try:
        with warnings.catch_warnings():  # the size is checked below: refused, not warned about
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ResourceLimitError(f"{path}: {exc}") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and im.size[0] * im.size[1] > limit:
        im.close()
        raise ResourceLimitError(f"{path}: image of {im.size[0]}x{im.size[1]} pixels, over Pillow's limit of "
                                 f"{limit:,} pixels (a decompression bomb?); refusing it")
    return im


def load_image(path: str, plan: ImagePlan) -> np.ndarray:
    """Decode one image into a sample of ``plan.sample_shape`` (float32, or uint8 if not normalised)."""
    Image = import_pil()
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[plan.channels]
    with _open_bounded(Image, path) as im:
        im = im.convert(mode)
        if im.size != (plan.width, plan.height):
            im = im.resize((plan.width, plan.height), Image.BILINEAR)
        a = np.asarray(im)
    if a.ndim == 2:
        a = a[..., None]
    if plan.normalise:
        a = (a.astype(np.float32) * np.float32(plan.scale) - plan.mean) / plan.std
    if plan.layout == "NCHW":
        a = a.transpose(2, 0, 1)
    return np.ascontiguousarray(a)


def verify_image(path: str) -> None:
    """Check that ``path`` decodes as an image (header and structure); raises Corrupt otherwise, and
    ResourceLimitError for an image beyond Pillow's pixel limit."""
    Image = import_pil()
    try:
        with _open_bounded(Image, path) as im:
            im.verify()
    except ResourceLimitError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise Corrupt(f"not a readable image ({exc})") from exc
