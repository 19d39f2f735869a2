"""Convolutions, normalisations, activations, softmax, pooling, dropout.

Tensors are NC[D][H]W as in ONNX; spatial rank is read from the input at run time (1-3 spatial dims).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ops import NodeCtx, register_op

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _torch_pad(begin: list[int], end: list[int]) -> list[int]:
    """ONNX per-axis (begin, end) for the trailing axes -> F.pad's last-axis-first list."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


def _same_pads(auto_pad: str, in_sizes, kernel, strides, dilations) -> tuple[list[int], list[int]]:
    begin, end = [], []
    for n, k, s, d in zip(in_sizes, kernel, strides, dilations):
        out = -(-n // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
        small, big = total // 2, total - total // 2
        if auto_pad == "SAME_UPPER":
            begin.append(small), end.append(big)
        else:
            begin.append(big), end.append(small)
    return begin, end


def _window_params(ctx: NodeCtx, x: torch.Tensor, kernel: list[int]):
    """(strides, dilations, begin pads, end pads) of a conv/pool node for input ``x``."""
    nsp = x.dim() - 2
    strides = list(ctx.attr("strides", [1] * nsp))
    dil = list(ctx.attr("dilations", [1] * nsp))
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = _same_pads(auto_pad, x.shape[2:], kernel, strides, dil)
    elif auto_pad == "VALID":
        begin, end = [0] * nsp, [0] * nsp
    else:
        pads = list(ctx.attr("pads", [0] * (2 * nsp)))
        begin, end = pads[:nsp], pads[nsp:]
    return strides, dil, begin, end


# ---- convolution ----------------------------------------------------------------------------------

@register_op("Conv")
def _conv(ctx, x, w, b=None):
    """x (N, C, *S), w (M, C/group, *k), b (M,) -> (N, M, *S')."""
    key = ctx.cache.get("p")
    if key is None or key[0] != x.dim():
        kernel = list(w.shape[2:])
        strides, dil, begin, end = _window_params(ctx, x, kernel)
        same_auto = ctx.attr("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER")
        sym = begin == end
        key = (x.dim(), strides, dil, begin if sym else 0, None if sym else _torch_pad(begin, end),
               ctx.attr("group", 1))
        if not same_auto:  # SAME pads depend on the input size: recomputed every call
            ctx.cache["p"] = key
    _, strides, dil, padding, tpad, groups = key
    if tpad is not None:
        x = F.pad(x, tpad)
        padding = 0
    return _CONV[x.dim() - 2](x, w, b, strides, padding, dil, groups)


@register_op("ConvTranspose")
def _conv_transpose(ctx, x, w, b=None):
    """x (N, C, *S), w (C, M/group, *k), b (M,) -> (N, M, *S')."""
    nsp = x.dim() - 2
    kernel = list(w.shape[2:])
    strides = list(ctx.attr("strides", [1] * nsp))
    dil = list(ctx.attr("dilations", [1] * nsp))
    outpad = list(ctx.attr("output_padding", [0] * nsp))
    group = ctx.attr("group", 1)
    full = [s * (n - 1) + (k - 1) * d + 1 for n, s, k, d in zip(x.shape[2:], strides, kernel, dil)]
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    out_shape = ctx.attr("output_shape")
    if out_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if out_shape is None:
            out_shape = [n * s for n, s in zip(x.shape[2:], strides)]
        out_shape = list(out_shape)[-nsp:]
        total = [f + op - o for f, op, o in zip(full, outpad, out_shape)]
        if auto_pad == "SAME_UPPER":
            begin = [t // 2 for t in total]
        else:
            begin = [t - t // 2 for t in total]
        end = [t - bg for t, bg in zip(total, begin)]
    elif auto_pad == "VALID":
        begin, end = [0] * nsp, [0] * nsp
    else:
        pads = list(ctx.attr("pads", [0] * (2 * nsp)))
        begin, end = pads[:nsp], pads[nsp:]
    fn = _CONVT[nsp]
    if begin == end and all(p < max(s, d) for p, s, d in zip(outpad, strides, dil)):
        return fn(x, w, b, strides, begin, outpad, group, dil)
    y = fn(x, w, None, strides, 0, 0, group, dil)
    # crop the pads, then extend by output_padding at the end (zeros before the bias, as in ONNX)
    y = F.pad(y, _torch_pad([-p for p in begin], [op - p for p, op in zip(end, outpad)]))
    if b is not None:
        y = y + b.reshape([1, -1] + [1] * nsp)
    return y


# ---- normalisation --------------------------------------------------------------------------------

@register_op("BatchNormalization", static_inputs=(3, 4))
def _batch_norm(ctx, x, scale, bias, mean, var, *_):
    """x (N, C, *S); scale/bias/mean/var (C,). eval: stored statistics; train: batch statistics with
    the running statistics updated in place like torch.nn.BatchNorm (unbiased variance, torch momentum
    = 1 - ONNX momentum); train with the module's ``bn_stats_frozen``: stored statistics (scale and
    bias still get gradients)."""
    eps = ctx.attr("epsilon", 1e-5)
    momentum = 1.0 - ctx.attr("momentum", 0.9)
    spatial = ctx.attr("spatial", 1)
    training = ctx.training and not getattr(ctx.module, "bn_stats_frozen", False)
    xin, sh = x, None
    if not spatial and x.dim() > 2:  # opset < 9 per-activation statistics of shape (C, *S)
        sh = x.shape
        x = x.reshape(sh[0], -1)
        scale, bias, mean, var = (t.reshape(-1) for t in (scale, bias, mean, var))
    if training:
        if mean.requires_grad or var.requires_grad:  # statistics computed in-graph: not updatable
            mean, var = mean.detach().clone(), var.detach().clone()
        y = F.batch_norm(x, mean, var, scale, bias, True, momentum, eps)
    else:
        y = F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
    if sh is not None:
        y = y.reshape(sh)
    if ctx.n_outputs <= 1:
        return y
    extra = [mean.detach(), var.detach()]
    if ctx.n_outputs > 3:
        dims = [0] + list(range(2, xin.dim()))
        bm = xin.detach().mean(dims)
        extra += [bm, xin.detach().var(dims, unbiased=False)]
    return (y, *extra[: ctx.n_outputs - 1])


@register_op("InstanceNormalization")
def _instance_norm(ctx, x, scale, bias):
    return F.instance_norm(x, weight=scale, bias=bias, eps=ctx.attr("epsilon", 1e-5))


def _ln_stats(x, axis, eps, rms: bool):
    dims = list(range(axis, x.dim()))
    if rms:
        return None, torch.rsqrt(torch.mean(x * x, dim=dims, keepdim=True) + eps)
    mean = torch.mean(x, dim=dims, keepdim=True)
    var = torch.mean((x - mean) ** 2, dim=dims, keepdim=True)
    return mean, torch.rsqrt(var + eps)


def _layer_norm(ctx, x, scale, bias=None, rms=False):
    axis = ctx.attr("axis", -1) % x.dim()
    eps = ctx.attr("epsilon", 1e-5)
    norm_shape = tuple(x.shape[axis:])
    if ctx.n_outputs <= 1 and tuple(scale.shape) == norm_shape and (
            bias is None or tuple(bias.shape) == norm_shape):
        if rms:
            return F.rms_norm(x, norm_shape, scale, eps)
        return F.layer_norm(x, norm_shape, scale, bias, eps)
    mean, inv = _ln_stats(x, axis, eps, rms)
    y = (x if mean is None else x - mean) * inv * scale
    if bias is not None:
        y = y + bias
    if ctx.n_outputs <= 1:
        return y
    outs = [y] + ([mean, inv] if not rms else [inv])
    return tuple(outs[: ctx.n_outputs])


@register_op("LayerNormalization")
def _ln(ctx, x, scale, bias=None):
    return _layer_norm(ctx, x, scale, bias)


@register_op("LayerNormalization", domain="com.microsoft")
def _ln_ms(ctx, x, scale, bias=None):
    return _layer_norm(ctx, x, scale, bias)


@register_op("RMSNormalization", since=23)
def _rms(ctx, x, scale):
    return _layer_norm(ctx, x, scale, None, rms=True)


@register_op("SimplifiedLayerNormalization")
@register_op("SimplifiedLayerNormalization", domain="com.microsoft")
def _sln(ctx, x, scale):
    return _layer_norm(ctx, x, scale, None, rms=True)


def _skip_ln(ctx, x, skip, gamma, beta=None, bias=None, rms=False):
    s = x + skip
    if bias is not None:
        s = s + bias
    eps = ctx.attr("epsilon", 1e-12)
    mean, inv = _ln_stats(s, s.dim() - 1, eps, rms)
    y = (s if mean is None else s - mean) * inv * gamma
    if beta is not None:
        y = y + beta
    outs = [y, mean, inv, s]
    if ctx.n_outputs <= 1:
        return y
    return tuple(outs[: ctx.n_outputs])


@register_op("SkipLayerNormalization", domain="com.microsoft")
def _skip_layer_norm(ctx, x, skip, gamma, beta=None, bias=None):
    return _skip_ln(ctx, x, skip, gamma, beta, bias)


@register_op("SkipSimplifiedLayerNormalization", domain="com.microsoft")
def _skip_simplified(ctx, x, skip, gamma, bias=None):
    return _skip_ln(ctx, x, skip, gamma, None, bias, rms=True)


# ---- activations ----------------------------------------------------------------------------------

@register_op("LeakyRelu")
def _leaky(ctx, x):
    return F.leaky_relu(x, ctx.attr("alpha", 0.01))


@register_op("PRelu")
def _prelu(ctx, x, slope):
    return torch.where(x < 0, x * slope, x)


@register_op("Elu")
def _elu(ctx, x):
    return F.elu(x, ctx.attr("alpha", 1.0))


@register_op("Selu")
def _selu(ctx, x):
    alpha = ctx.attr("alpha", 1.67326319217681884765625)
    gamma = ctx.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@register_op("Celu")
def _celu(ctx, x):
    return F.celu(x, ctx.attr("alpha", 1.0))


@register_op("Clip", static_inputs=(1, 2))
def _clip(ctx, x, lo=None, hi=None):
    if ctx.opset < 11:
        lo_v, hi_v = ctx.attr("min"), ctx.attr("max")
    else:
        lo_v = ctx.floats(1, lo)[0] if lo is not None else None
        hi_v = ctx.floats(2, hi)[0] if hi is not None else None
    if lo_v == 0.0 and hi_v == 6.0 and x.is_floating_point():
        return F.relu6(x)
    if lo_v is None and hi_v is None:
        return x
    if not x.is_floating_point():
        lo_v = None if lo_v is None else int(lo_v)
        hi_v = None if hi_v is None else int(hi_v)
    return torch.clamp(x, lo_v, hi_v)


@register_op("HardSigmoid")
def _hard_sigmoid(ctx, x):
    alpha, beta = ctx.attr("alpha", 0.2), ctx.attr("beta", 0.5)
    return torch.clamp(alpha * x + beta, 0.0, 1.0)


@register_op("HardSwish")
def _hard_swish(ctx, x):
    return F.hardswish(x)


@register_op("Gelu", since=20)
@register_op("Gelu", domain="com.microsoft")
def _gelu(ctx, x):
    return F.gelu(x, approximate=ctx.attr("approximate", "none"))


@register_op("FastGelu", domain="com.microsoft")
def _fast_gelu(ctx, x, bias=None):
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


@register_op("Softplus")
def _softplus(ctx, x):
    return F.softplus(x)


@register_op("Mish", since=18)
def _mish(ctx, x):
    return F.mish(x)


def _softmax_like(fn):
    def conv(ctx, x):
        if ctx.opset >= 13:
            return fn(x, ctx.attr("axis", -1))
        # opset < 13: coerce to 2-D [prod(d[:axis]), prod(d[axis:])] and normalise over the second
        axis = ctx.attr("axis", 1) % max(x.dim(), 1)
        sh = x.shape
        y = fn(x.reshape(math.prod(sh[:axis]), -1), 1)
        return y.reshape(sh)

    return conv


register_op("Softmax")(_softmax_like(lambda x, d: torch.softmax(x, d)))
register_op("LogSoftmax")(_softmax_like(lambda x, d: torch.log_softmax(x, d)))


# ---- pooling --------------------------------------------------------------------------------------

def _maxpool_check(ctx):
    if len(ctx.node.output) > 1 and ctx.node.output[1] and ctx.attr("storage_order", 0):
        return "Indices output with storage_order=1"
    return None


@register_op("MaxPool", check=_maxpool_check)
def _max_pool(ctx, x):
    """x (N, C, *S) -> (N, C, *S') [, Indices int64 flattened over the whole tensor as in ONNX]."""
    kernel = list(ctx.attr("kernel_shape"))
    strides, dil, begin, end = _window_params(ctx, x, kernel)
    ceil = bool(ctx.attr("ceil_mode", 0))
    fn = _MAXPOOL[x.dim() - 2]
    want_idx = ctx.n_outputs > 1
    if begin == end and all(2 * p <= k for p, k in zip(begin, kernel)):
        res = fn(x, kernel, strides, begin, dil, ceil, want_idx)
    else:
        xp = F.pad(x, _torch_pad(begin, end), value=float("-inf"))
        res = fn(xp, kernel, strides, 0, dil, ceil, want_idx)
        if want_idx:
            raise NotImplementedError("MaxPool Indices with asymmetric pads")
    if not want_idx:
        return res
    y, idx = res
    plane = math.prod(x.shape[2:])
    base = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(
        [x.shape[0], x.shape[1]] + [1] * (x.dim() - 2)) * plane
    return y, idx + base


@register_op("AveragePool")
def _avg_pool(ctx, x):
    kernel = list(ctx.attr("kernel_shape"))
    strides, dil, begin, end = _window_params(ctx, x, kernel)
    if any(d != 1 for d in dil):
        raise NotImplementedError("AveragePool with dilations")
    ceil = bool(ctx.attr("ceil_mode", 0))
    incl = bool(ctx.attr("count_include_pad", 0))
    fn = _AVGPOOL[x.dim() - 2]
    if begin == end and all(2 * p <= k for p, k in zip(begin, kernel)):
        return fn(x, kernel, strides, begin, ceil, incl)
    tp = _torch_pad(begin, end)
    y = fn(F.pad(x, tp), kernel, strides, 0, ceil, True)
    if incl:
        return y
    ones = F.pad(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device), tp)
    return y / fn(ones, kernel, strides, 0, ceil, True)


@register_op("GlobalAveragePool")
def _gap(ctx, x):
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@register_op("GlobalMaxPool")
def _gmp(ctx, x):
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@register_op("Dropout", static_inputs=(1, 2))
def _dropout(ctx, x, ratio=None, training_mode=None):
    """Active only when the module is in train mode (ratio from the attribute or input, default 0.5)."""
    if ctx.opset >= 12:
        p = ctx.floats(1, ratio)[0] if ratio is not None else 0.5
    else:
        p = ctx.attr("ratio", 0.5)
    if ctx.training and p > 0:
        mask = (torch.rand_like(x) >= p)
        y = x * mask / (1.0 - p)
    else:
        y, mask = x, None
    if ctx.n_outputs <= 1:
        return y
    if mask is None:
        mask = torch.ones_like(x, dtype=torch.bool)
    return y, mask
