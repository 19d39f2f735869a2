"""Shape manipulation, indexing, casts, constants, Pad, Resize/Upsample.

Shape values are int64 tensors computed at run time (Shape -> Gather -> Concat -> Reshape chains follow
the actual batch size); converters turn them into Python ints only where torch needs ints.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .ops import register_op, to_tensor, torch_dtype

_INT64_MAX = 2**63 - 1


@register_op("Reshape", static_inputs=(1,))
def _reshape(ctx, x, shape_t=None):
    shape = ctx.ints(1, shape_t) if ctx.opset >= 5 else list(ctx.attr("shape"))
    if not ctx.attr("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@register_op("Flatten")
def _flatten(ctx, x):
    axis = ctx.attr("axis", 1)
    if axis < 0:
        axis += x.dim()
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@register_op("Transpose")
def _transpose(ctx, x):
    perm = ctx.attr("perm")
    if perm is None:
        perm = list(range(x.dim() - 1, -1, -1))
    return x.permute(perm)


@register_op("Squeeze", static_inputs=(1,))
def _squeeze(ctx, x, axes_t=None):
    axes = ctx.ints(1, axes_t) if ctx.opset >= 13 else ctx.attr("axes")
    if not axes:
        return torch.squeeze(x)
    return torch.squeeze(x, tuple(a % x.dim() for a in axes))


@register_op("Unsqueeze", static_inputs=(1,))
def _unsqueeze(ctx, x, axes_t=None):
    axes = ctx.ints(1, axes_t) if ctx.opset >= 13 else ctx.attr("axes")
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = torch.unsqueeze(x, a)
    return x


@register_op("Concat")
def _concat(ctx, *xs):
    return torch.cat(xs, ctx.attr("axis", 0))


@register_op("Split", static_inputs=(1,))
def _split(ctx, x, split_t=None):
    axis = ctx.attr("axis", 0) % x.dim()
    n = len(ctx.node.output)
    split = ctx.ints(1, split_t) if ctx.opset >= 13 else ctx.attr("split")
    if not split:
        dim = x.shape[axis]
        if ctx.opset >= 18 and ctx.attr("num_outputs") is not None:
            n = ctx.attr("num_outputs")
            size = -(-dim // n)
            split = [size] * (n - 1) + [dim - size * (n - 1)]
        else:
            split = [dim // n] * n
    return tuple(torch.split(x, list(split), axis))


def _slice_axis(x: torch.Tensor, axis: int, start: int, end: int, step: int) -> torch.Tensor:
    dim = x.shape[axis]
    if start < 0:
        start += dim
    if end < 0:
        end += dim
    if step > 0:
        start = min(max(start, 0), dim)
        end = min(max(end, 0), dim)
        if start == 0 and end == dim and step == 1:
            return x
        idx = [slice(None)] * x.dim()
        idx[axis] = slice(start, end, step)
        return x[tuple(idx)]
    start = min(max(start, 0), dim - 1)
    end = min(max(end, -1), dim - 1)
    index = torch.arange(start, end, step, device=x.device)
    return torch.index_select(x, axis, index)


@register_op("Slice", static_inputs=(1, 2, 3, 4))
def _slice(ctx, x, starts_t=None, ends_t=None, axes_t=None, steps_t=None):
    if ctx.opset >= 10:
        starts, ends = ctx.ints(1, starts_t), ctx.ints(2, ends_t)
        axes, steps = ctx.ints(3, axes_t), ctx.ints(4, steps_t)
    else:
        starts, ends, axes, steps = ctx.attr("starts"), ctx.attr("ends"), ctx.attr("axes"), None
    if axes is None:
        axes = list(range(len(starts)))
    if steps is None:
        steps = [1] * len(starts)
    for a, s, e, st in zip(axes, starts, ends, steps):
        x = _slice_axis(x, a % x.dim(), s, e, st)
    return x


@register_op("Gather")
def _gather(ctx, x, idx):
    axis = ctx.attr("axis", 0) % x.dim()
    if idx.dim() == 0:
        return torch.select(x, axis, int(idx))
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    if axis == 0 and x.dim() == 2:
        return F.embedding(idx, x)
    flat = torch.index_select(x, axis, idx.reshape(-1))
    return flat.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))


@register_op("GatherElements")
def _gather_elements(ctx, x, idx):
    axis = ctx.attr("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return torch.gather(x, axis, idx)


@register_op("GatherND")
def _gather_nd(ctx, x, idx):
    b = ctx.attr("batch_dims", 0)
    if b:
        raise NotImplementedError("GatherND with batch_dims")
    k = idx.shape[-1]
    idx = torch.where(idx < 0, idx + torch.tensor(x.shape[:k], device=idx.device), idx)
    flat = idx.reshape(-1, k)
    out = x[tuple(flat[:, i] for i in range(k))]
    return out.reshape(tuple(idx.shape[:-1]) + tuple(x.shape[k:]))


@register_op("Expand", static_inputs=(1,))
def _expand(ctx, x, shape_t):
    shape = ctx.ints(1, shape_t)
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(shape)))


@register_op("Tile", static_inputs=(1,))
def _tile(ctx, x, repeats_t):
    return x.repeat(ctx.ints(1, repeats_t))


@register_op("Cast")
def _cast(ctx, x):
    dt = ctx.cache.get("dt")
    if dt is None:
        dt = ctx.cache["dt"] = torch_dtype(ctx.attr("to"))
    return x.to(dt)


@register_op("CastLike")
def _cast_like(ctx, x, like):
    return x.to(like.dtype)


@register_op("Shape")
def _shape(ctx, x):
    dims = list(x.shape)
    start, end = ctx.attr("start", 0), ctx.attr("end")
    dims = dims[start:end] if end is not None else dims[start:]
    return torch.tensor(dims, dtype=torch.int64, device=x.device)


@register_op("Size")
def _size(ctx, x):
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@register_op("ConstantOfShape", static_inputs=(0,))
def _constant_of_shape(ctx, shape_t):
    shape = ctx.ints(0, shape_t)
    value = ctx.attr("value")
    if value is None:
        return torch.zeros(shape, dtype=torch.float32, device=shape_t.device)
    v = to_tensor(np.asarray(value).reshape(-1)[:1])
    return torch.full(shape, v.item(), dtype=v.dtype, device=shape_t.device)


def constant_value(attrs: dict) -> np.ndarray:
    """The value of a Constant node from whichever value* attribute it carries."""
    if "value" in attrs:
        return np.asarray(attrs["value"])
    if "value_float" in attrs:
        return np.asarray(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.asarray(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.asarray(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.asarray(attrs["value_ints"], dtype=np.int64)
    if "sparse_value" in attrs:
        from onnx import numpy_helper

        sp = attrs["sparse_value"]
        dense = np.zeros(tuple(sp.dims), dtype=numpy_helper.to_array(sp.values).dtype)
        vals = numpy_helper.to_array(sp.values)
        idx = numpy_helper.to_array(sp.indices)
        if idx.ndim == 1:
            dense.reshape(-1)[idx] = vals
        else:
            dense[tuple(idx.T)] = vals
        return dense
    raise NotImplementedError("Constant with a string value")


def _constant_check(ctx):
    if any(k in ctx.attrs for k in ("value_string", "value_strings")):
        return "string value"
    return None


@register_op("Constant", check=_constant_check)
def _constant(ctx):
    """Constant nodes are evaluated once by OnnxModule (their values become parameters or buffers);
    this converter only runs for a Constant inside an unsupported context."""
    return to_tensor(constant_value(ctx.attrs))


@register_op("Range")
def _range(ctx, start, limit, delta):
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


@register_op("Trilu", since=14, static_inputs=(1,))
def _trilu(ctx, x, k_t=None):
    k = ctx.ints(1, k_t)[0] if k_t is not None else 0
    return torch.triu(x, k) if ctx.attr("upper", 1) else torch.tril(x, k)


@register_op("DepthToSpace")
def _depth_to_space(ctx, x):
    b = ctx.attr("blocksize")
    n, c, h, w = x.shape
    if ctx.attr("mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


@register_op("SpaceToDepth")
def _space_to_depth(ctx, x):
    b = ctx.attr("blocksize")
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


# ---- Pad ------------------------------------------------------------------------------------------

_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


@register_op("Pad", static_inputs=(1, 2, 3))
def _pad(ctx, x, pads_t=None, value_t=None, axes_t=None):
    """pads [x1_begin, x2_begin, ..., x1_end, x2_end] (negative = crop) over ``axes`` (default all)."""
    mode = _PAD_MODES[ctx.attr("mode", "constant")]
    if ctx.opset >= 11:
        pads = ctx.ints(1, pads_t)
        value = 0.0 if value_t is None or value_t.numel() == 0 else value_t.item()
        axes = ctx.ints(3, axes_t) if axes_t is not None else None
    else:
        pads = list(ctx.attr("pads") if ctx.opset >= 2 else ctx.attr("paddings"))
        value = ctx.attr("value", 0.0)
        axes = None
    r = x.dim()
    axes = list(range(r)) if axes is None else [a % r for a in axes]
    n = len(axes)
    begin, end = [0] * r, [0] * r
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[i + n]
    first = next((i for i in range(r) if begin[i] or end[i]), r)
    if first == r:
        return x
    tp: list[int] = []
    for i in range(r - 1, first - 1, -1):
        tp += [begin[i], end[i]]
    if mode == "constant":
        return F.pad(x, tp, mode="constant", value=value)
    if r - first > 3 or first < 1:
        # torch pads at most the last three axes in these modes and needs a leading batch axis
        raise NotImplementedError(f"Pad mode {mode} over {r - first} leading axes")
    return F.pad(x, tp, mode=mode)


# ---- Resize / Upsample ----------------------------------------------------------------------------

def _resize_check(ctx):
    mode = ctx.attr("mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear"):
        return f"mode={mode}"
    if ctx.attr("antialias", 0):
        return "antialias=1"
    if ctx.attr("coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
        return "coordinate_transformation_mode=tf_crop_and_resize"
    if ctx.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        return "keep_aspect_ratio_policy"
    return None


def _source_coords(ctm: str, out_n: int, in_n: int, scale: float, device) -> torch.Tensor:
    x = torch.arange(out_n, dtype=torch.float64, device=device)
    if ctm == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if ctm == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out_n > 1 else torch.zeros_like(x)
    if ctm == "align_corners":
        return x * ((in_n - 1) / (out_n - 1)) if out_n > 1 else torch.zeros_like(x)
    if ctm == "asymmetric":
        return x / scale
    if ctm == "half_pixel_symmetric":
        adj = out_n / (scale * in_n)
        center = in_n / 2
        off = center * (1 - adj)
        return off + (x + 0.5) / scale - 0.5
    raise NotImplementedError(f"coordinate_transformation_mode={ctm}")


def _nearest_index(src: torch.Tensor, mode: str, in_n: int) -> torch.Tensor:
    if mode == "floor":
        i = torch.floor(src)
    elif mode == "ceil":
        i = torch.ceil(src)
    elif mode == "round_prefer_ceil":
        i = torch.floor(src + 0.5)
    else:  # round_prefer_floor
        i = torch.ceil(src - 0.5)
    return i.clamp(0, in_n - 1).to(torch.int64)


def _resize_impl(ctx, x, scales, sizes, mode, ctm, nearest_mode, axes=None):
    r = x.dim()
    axes = list(range(r)) if axes is None else [a % r for a in axes]
    full_scales = [1.0] * r
    out_sizes = list(x.shape)
    if sizes is not None:
        for a, s in zip(axes, sizes):
            out_sizes[a] = int(s)
            full_scales[a] = s / x.shape[a]
    else:
        for a, s in zip(axes, scales):
            full_scales[a] = float(s)
            out_sizes[a] = int(math.floor(x.shape[a] * s))
    key = (tuple(x.shape), tuple(out_sizes), tuple(full_scales), str(x.device))
    plan = ctx.cache.get("plan")
    if plan is None or plan[0] != key:
        steps = []
        for a in range(r):
            if out_sizes[a] == x.shape[a] and full_scales[a] == 1.0:
                continue
            src = _source_coords(ctm, out_sizes[a], x.shape[a], full_scales[a], x.device)
            if mode == "nearest":
                steps.append((a, _nearest_index(src, nearest_mode, x.shape[a]), None, None))
            else:
                src = src.clamp(0, x.shape[a] - 1)
                i0 = torch.floor(src).to(torch.int64)
                i1 = torch.clamp(i0 + 1, max=x.shape[a] - 1)
                w = (src - i0).to(x.dtype).reshape([-1] + [1] * (r - a - 1))
                steps.append((a, i0, i1, w))
        plan = (key, steps)
        ctx.cache["plan"] = plan
    for a, i0, i1, w in plan[1]:
        if i1 is None:
            x = torch.index_select(x, a, i0)
        else:
            lo, hi = torch.index_select(x, a, i0), torch.index_select(x, a, i1)
            x = lo + (hi - lo) * w
    return x


@register_op("Resize", check=_resize_check, static_inputs=(1, 2, 3))
def _resize(ctx, x, roi=None, scales=None, sizes=None):
    mode = ctx.attr("mode", "nearest")
    mode = "linear" if mode == "bilinear" else mode
    if ctx.opset < 11:  # Resize-10: inputs (X, scales), asymmetric coordinates
        return _resize_impl(ctx, x, ctx.floats(1, roi), None, mode, "asymmetric", "floor")
    sc = ctx.floats(2, scales) if scales is not None and scales.numel() else None
    sz = ctx.ints(3, sizes) if sizes is not None and sizes.numel() else None
    return _resize_impl(ctx, x, sc, sz, mode,
                        ctx.attr("coordinate_transformation_mode", "half_pixel"),
                        ctx.attr("nearest_mode", "round_prefer_floor"), ctx.attr("axes"))


@register_op("Upsample", until=9, check=_resize_check, static_inputs=(1,))
def _upsample(ctx, x, scales_t=None):
    mode = ctx.attr("mode", "nearest")
    mode = "linear" if mode == "bilinear" else mode
    scales = ctx.floats(1, scales_t) if scales_t is not None else ctx.attr("scales")
    if scales is None:  # Upsample-1: width_scale / height_scale attributes on NCHW
        scales = [1.0, 1.0, ctx.attr("height_scale"), ctx.attr("width_scale")]
    return _resize_impl(ctx, x, scales, None, mode, "asymmetric", "floor")


@register_op("ScatterND")
def _scatter_nd(ctx, x, idx, upd):
    if ctx.attr("reduction", "none") != "none":
        raise NotImplementedError("ScatterND with a reduction")
    out = x.clone()
    k = idx.shape[-1]
    flat = idx.reshape(-1, k)
    out[tuple(flat[:, i] for i in range(k))] = upd.reshape((flat.shape[0],) + tuple(x.shape[k:]))
    return out
