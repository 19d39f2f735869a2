"""Element-wise arithmetic, comparisons, logic, reductions, Einsum, MatMul, Gemm, ArgMax, TopK."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .ops import NodeCtx, register_op


def _floating(t: torch.Tensor) -> bool:
    return t.is_floating_point()


# ---- binary arithmetic (numpy-style broadcasting, like torch) -------------------------------------

@register_op("Add")
def _add(ctx, a, b):
    return a + b


@register_op("Sub")
def _sub(ctx, a, b):
    return a - b


@register_op("Mul")
def _mul(ctx, a, b):
    return a * b


@register_op("Div")
def _div(ctx, a, b):
    if _floating(a):
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # ONNX integer division truncates


@register_op("Pow")
def _pow(ctx, a, b):
    out = torch.pow(a, b)
    return out if out.dtype == a.dtype else out.to(a.dtype)  # output type follows the base


@register_op("Mod")
def _mod(ctx, a, b):
    if ctx.attr("fmod", 0) or _floating(a):
        return torch.fmod(a, b)
    return torch.remainder(a, b)


def _unary(op_type: str, fn) -> None:
    register_op(op_type)(lambda ctx, x: fn(x))


for _name, _fn in {
    "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs, "Exp": torch.exp, "Log": torch.log,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round,
    "Sign": torch.sign, "Sin": torch.sin, "Cos": torch.cos, "Tanh": torch.tanh, "Sigmoid": torch.sigmoid,
    "Erf": torch.erf, "Relu": F.relu, "Softsign": F.softsign, "Not": torch.logical_not,
    "IsNaN": torch.isnan, "Identity": lambda x: x,
}.items():
    _unary(_name, _fn)


# ---- variadic -------------------------------------------------------------------------------------

@register_op("Sum")
def _sum(ctx, *xs):
    return functools.reduce(torch.add, xs)


@register_op("Mean")
def _mean(ctx, *xs):
    return functools.reduce(torch.add, xs) / len(xs)


@register_op("Min")
def _min(ctx, *xs):
    return functools.reduce(torch.minimum, xs)


@register_op("Max")
def _max(ctx, *xs):
    return functools.reduce(torch.maximum, xs)


# ---- comparisons and logic -----------------------------------------------------------------------

for _name, _fn in {
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}.items():
    register_op(_name)(functools.partial(lambda fn, ctx, a, b: fn(a, b), _fn))


@register_op("Where")
def _where(ctx, cond, a, b):
    return torch.where(cond, a, b)


@register_op("IsInf")
def _isinf(ctx, x):
    pos, neg = ctx.attr("detect_positive", 1), ctx.attr("detect_negative", 1)
    if pos and neg:
        return torch.isinf(x)
    if pos:
        return torch.isposinf(x)
    if neg:
        return torch.isneginf(x)
    return torch.zeros_like(x, dtype=torch.bool)


# ---- matrix products ------------------------------------------------------------------------------

@register_op("MatMul")
def _matmul(ctx, a, b):
    return torch.matmul(a, b)


@register_op("Gemm")
def _gemm(ctx, a, b, c=None):
    """Y = alpha * A' @ B' + beta * C; A (M, K) or transposed, B (K, N) or transposed."""
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    ta, tb = ctx.attr("transA", 0), ctx.attr("transB", 0)
    if not ta and tb and alpha == 1.0 and (c is None or beta == 1.0):
        return F.linear(a, b, c)  # the common nn.Linear form
    if ta:
        a = a.t()
    if tb:
        b = b.t()
    y = torch.matmul(a, b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


@register_op("Einsum")
def _einsum(ctx, *xs):
    return torch.einsum(ctx.attr("equation").replace(" ", ""), *xs)


# ---- reductions -----------------------------------------------------------------------------------

def _axes(ctx: NodeCtx, axes_input_since: int, axes_t) -> list[int] | None:
    if ctx.opset >= axes_input_since:
        return ctx.ints(1, axes_t)
    return ctx.attr("axes")


def _reduce(op_type: str, fn, axes_input_since: int) -> None:
    def conv(ctx, x, axes_t=None):
        axes = _axes(ctx, axes_input_since, axes_t)
        keep = bool(ctx.attr("keepdims", 1))
        if not axes:
            if ctx.attr("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        axes = [a % x.dim() for a in axes] if x.dim() else []
        return fn(x, axes, keep)

    register_op(op_type, static_inputs=(1,))(conv)


def _prod(x, axes, keep):
    for a in sorted(axes, reverse=True):
        x = torch.prod(x, a, keepdim=keep) if keep else torch.prod(x, a)
    return x


def _dims_or_all(fn):
    return lambda x, axes, keep: fn(x, dim=axes, keepdim=keep) if axes else x


_reduce("ReduceMean", _dims_or_all(torch.mean), 18)
_reduce("ReduceSum", _dims_or_all(torch.sum), 13)
_reduce("ReduceMax", _dims_or_all(torch.amax), 18)
_reduce("ReduceMin", _dims_or_all(torch.amin), 18)
_reduce("ReduceProd", _prod, 18)
_reduce("ReduceL2", lambda x, a, k: torch.sqrt(torch.sum(x * x, dim=a, keepdim=k)) if a else x.abs(), 18)
_reduce("ReduceL1", lambda x, a, k: torch.sum(x.abs(), dim=a, keepdim=k) if a else x.abs(), 18)
_reduce("ReduceSumSquare", lambda x, a, k: torch.sum(x * x, dim=a, keepdim=k) if a else x * x, 18)
_reduce("ReduceLogSumExp", lambda x, a, k: torch.logsumexp(x, dim=a, keepdim=k) if a else x, 18)


def _arg(fn):
    def conv(ctx, x):
        axis = ctx.attr("axis", 0) % max(x.dim(), 1)
        keep = bool(ctx.attr("keepdims", 1))
        if ctx.attr("select_last_index", 0):
            n = x.shape[axis]
            idx = fn(torch.flip(x, (axis,)), dim=axis, keepdim=keep)
            return (n - 1) - idx
        return fn(x, dim=axis, keepdim=keep)

    return conv


register_op("ArgMax")(_arg(torch.argmax))
register_op("ArgMin")(_arg(torch.argmin))


@register_op("TopK", static_inputs=(1,))
def _topk(ctx, x, k_t=None):
    k = ctx.ints(1, k_t)[0] if ctx.opset >= 10 else ctx.attr("k")
    axis = ctx.attr("axis", -1)
    values, indices = torch.topk(x, k, dim=axis, largest=bool(ctx.attr("largest", 1)),
                                 sorted=bool(ctx.attr("sorted", 1)))
    return values, indices
