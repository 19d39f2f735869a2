"""Recurrent layers: ONNX LSTM, GRU and RNN (opset 7 on) as differentiable torch computations.

W, R, B (and the LSTM peepholes P, and initial_h / initial_c when they are constants) stay the graph's
own tensors: trainable ``nn.Parameter`` keyed by their ONNX names, in ONNX layout, so write_back stores
them unchanged in form. The general path evaluates the ONNX equations literally, one time step at a time
with torch matmuls, slicing the gates in ONNX order (LSTM i, o, f, c; GRU z, r, h).

Shapes (layout 0; layout 1 swaps the first two axes of X and Y and of initial_h / initial_c / Y_h / Y_c
as ONNX defines it):
  X (T, N, I); W (D, G*H, I); R (D, G*H, H); B (D, 2*G*H) = [Wb | Rb]; sequence_lens (N,) int;
  initial_h, initial_c (D, N, H); P (D, 3*H) = [Pi | Po | Pf]
  -> Y (T, D, N, H), Y_h (D, N, H), Y_c (D, N, H) (LSTM only)
with T time steps, N batch, I input size, H hidden size, G gates (LSTM 4, GRU 3, RNN 1) and D
directions (2 for bidirectional: index 0 forward, 1 reverse).

sequence_lens: steps at or past a sample's length leave its state unchanged and give zeros in Y (as
onnxruntime does); the reverse direction starts at the sample's last valid step.
Fast path: when a node's configuration is exactly one of torch's fused recurrent kernels (default
activations, or Relu / Tanh for RNN; no clip, peepholes or input_forget; GRU with linear_before_reset=1;
sequence_lens absent or all equal to T; float32 / float64), ``torch.lstm`` / ``torch.gru`` /
``torch.rnn_tanh`` / ``torch.rnn_relu`` run it on the ONNX tensors with their gate blocks permuted by
index_select (LSTM i,o,f,c -> torch i,f,g,o; GRU z,r,h -> torch r,z,n), which is differentiable, so the
gradients still reach the ONNX-named parameters. Training step (forward + backward, one thread,
bidirectional LSTM, T=40, N=32, I=256, H=128): fused 320-360 ms, step loop 655 ms, torch.nn.LSTM
290 ms. ``FUSED = False`` forces the loop (tests compare both).

clip: the pre-activation of every gate is clamped to [-clip, clip] (the ONNX "input of activations").
Supported activations: those of the ONNX RNN family (Sigmoid, Tanh, Relu, Affine, LeakyRelu,
ThresholdedRelu, ScaledTanh, HardSigmoid, Elu, Softsign, Softplus); alpha / beta are taken from
activation_alpha / activation_beta in the order of the activations that use them.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .ops import NodeCtx, register_op

# name -> (fn(x, alpha, beta), default alpha or None when unused, default beta or None when unused)
_ACTIVATIONS: dict[str, tuple[Callable, float | None, float | None]] = {
    "sigmoid": (lambda x, a, b: torch.sigmoid(x), None, None),
    "tanh": (lambda x, a, b: torch.tanh(x), None, None),
    "relu": (lambda x, a, b: torch.relu(x), None, None),
    "affine": (lambda x, a, b: a * x + b, 1.0, 0.0),
    "leakyrelu": (lambda x, a, b: F.leaky_relu(x, a), 0.01, None),
    "thresholdedrelu": (lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x)), 1.0, None),
    "scaledtanh": (lambda x, a, b: a * torch.tanh(b * x), 1.0, 1.0),
    "hardsigmoid": (lambda x, a, b: torch.clamp(a * x + b, 0.0, 1.0), 0.2, 0.5),
    "elu": (lambda x, a, b: F.elu(x, a), 1.0, None),
    "softsign": (lambda x, a, b: F.softsign(x), None, None),
    "softplus": (lambda x, a, b: F.softplus(x), None, None),
}

_DEFAULTS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
_DIRECTIONS = {"forward": 1, "reverse": 1, "bidirectional": 2}

Act = Callable[[torch.Tensor], torch.Tensor]

FUSED = True  # use torch's fused kernels where exactly equivalent (see the module docstring)
# ONNX gate blocks -> torch's order: LSTM i,o,f,c -> i,f,c(g),o; GRU z,r,h -> r,z,h(n)
_TORCH_ORDER = {"LSTM": [0, 2, 3, 1], "GRU": [1, 0, 2], "RNN": [0]}


def _check(ctx: NodeCtx) -> str | None:
    """Reason the node's configuration is unsupported, or None."""
    direction = ctx.attr("direction", "forward")
    if direction not in _DIRECTIONS:
        return f"direction {direction!r} (forward, reverse or bidirectional)"
    layout = ctx.attr("layout", 0)
    if layout not in (0, 1):
        return f"layout {layout} (0 or 1)"
    if ctx.op_type == "LSTM" and ctx.attr("input_forget", 0) not in (0, 1):
        return f"input_forget {ctx.attr('input_forget')} (0 or 1)"
    acts = ctx.attr("activations")
    if acts is not None:
        unknown = sorted({a for a in acts if a.lower() not in _ACTIVATIONS})
        if unknown:
            return f"activation(s) {', '.join(unknown)} (supported: {', '.join(sorted(_ACTIVATIONS))})"
        want = len(_DEFAULTS[ctx.op_type]) * _DIRECTIONS[direction]
        if len(acts) != want:
            return f"{len(acts)} activations for direction {direction!r} (expected {want})"
    clip = ctx.attr("clip")
    if clip is not None and not clip > 0:
        return f"clip {clip} (must be positive)"
    return None


def _activations(ctx: NodeCtx, n_dir: int) -> list[list[Act]]:
    """Per direction, the activation callables (f, g, h order), alpha / beta bound."""
    cached = ctx.cache.get("acts")
    if cached is not None:
        return cached
    per_dir = len(_DEFAULTS[ctx.op_type])
    names = ctx.attr("activations") or list(_DEFAULTS[ctx.op_type]) * n_dir
    alphas = list(ctx.attr("activation_alpha", []) or [])
    betas = list(ctx.attr("activation_beta", []) or [])
    funcs: list[Act] = []
    for name in names:
        fn, da, db = _ACTIVATIONS[name.lower()]
        a = (alphas.pop(0) if alphas else da) if da is not None else None
        b = (betas.pop(0) if betas else db) if db is not None else None
        funcs.append(lambda x, fn=fn, a=a, b=b: fn(x, a, b))
    out = [funcs[d * per_dir:(d + 1) * per_dir] for d in range(n_dir)]
    ctx.cache["acts"] = out
    return out


def _time_index(lens: torch.Tensor, steps: int) -> torch.Tensor:
    """(T, N) index reversing each sample's valid prefix: t -> len-1-t for t < len, else t."""
    t = torch.arange(steps, device=lens.device).unsqueeze(1)
    return torch.where(t < lens.unsqueeze(0), lens.unsqueeze(0) - 1 - t, t)


def _gather_time(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (T, N, F) reindexed along time per sample: out[t, n] = x[idx[t, n], n]."""
    return torch.gather(x, 0, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class _Seq:
    """Time bookkeeping of one node call: steps T, lengths (N,) or None, the reversal index."""

    def __init__(self, x: torch.Tensor, lens: torch.Tensor | None):
        self.steps = x.shape[0]
        self.lens = None if lens is None else lens.to(device=x.device, dtype=torch.long)
        self.rev = None if self.lens is None else _time_index(self.lens, self.steps)
        self.masks = None
        if self.lens is not None:
            t = torch.arange(self.steps, device=x.device).unsqueeze(1)
            self.masks = (t < self.lens.unsqueeze(0)).to(x.dtype).unsqueeze(-1)  # (T, N, 1)

    def reverse(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(0) if self.rev is None else _gather_time(x, self.rev)


def _run(cell, seq: _Seq, xp: torch.Tensor, state: tuple[torch.Tensor, ...], reverse: bool):
    """Run ``cell(x_t, state) -> state`` (state[0] = h) over xp (T, N, *) in processing order.

    Returns (Y (T, N, H) in time order, final state). Masked steps keep the state and emit zeros.
    """
    if reverse:
        xp = seq.reverse(xp)
    ys = []
    for t in range(seq.steps):
        new = cell(xp[t], state)
        if seq.masks is not None:
            m = seq.masks[t]
            new = tuple(m * n + (1 - m) * s for n, s in zip(new, state))
            ys.append(m * new[0])
        else:
            ys.append(new[0])
        state = new
    y = torch.stack(ys, 0)
    if reverse:
        y = seq.reverse(y)
    return y, state


def _prepare(ctx: NodeCtx, x, states):
    """Layout-1 tensors to layout 0; returns (x, states, layout)."""
    layout = ctx.attr("layout", 0)
    if layout == 1:
        x = x.transpose(0, 1)
        states = [None if s is None else s.transpose(0, 1) for s in states]
    return x, states, layout


def _finish(ctx: NodeCtx, ys: list[torch.Tensor], finals: list[tuple[torch.Tensor, ...]], layout: int):
    """Per-direction Y (T, N, H) and final states -> (Y (T, D, N, H), Y_h (D, N, H)[, Y_c]) in the
    node's layout, only as many outputs as the graph asks for."""
    outs = []
    if ctx.n_outputs >= 1:
        y = torch.stack(ys, 1) if ctx.node.output[0] else None
        if y is not None and layout == 1:
            y = y.permute(2, 0, 1, 3)
        outs.append(y)
    for k in range(1, ctx.n_outputs):
        s = torch.stack([f[k - 1] for f in finals], 0)
        outs.append(s.transpose(0, 1) if layout == 1 else s)
    return tuple(outs)


def _clip(ctx: NodeCtx) -> Callable[[torch.Tensor], torch.Tensor]:
    c = ctx.attr("clip")
    if c is None:
        return lambda v: v
    c = float(c)
    return lambda v: torch.clamp(v, -c, c)


def _fused_kernel(ctx: NodeCtx, x: torch.Tensor, lens, p) -> Callable | None:
    """torch's fused kernel exactly equivalent to this node call, or None (then the step loop runs)."""
    if not FUSED or p is not None or ctx.attr("clip") is not None or x.dtype not in (torch.float32,
                                                                                    torch.float64):
        return None
    if ctx.op_type == "LSTM" and ctx.attr("input_forget", 0):
        return None
    if ctx.op_type == "GRU" and not ctx.attr("linear_before_reset", 0):
        return None
    acts = [a.lower() for a in (ctx.attr("activations") or _DEFAULTS[ctx.op_type])]
    if ctx.op_type == "RNN":
        if len(set(acts)) != 1 or acts[0] not in ("tanh", "relu"):
            return None
        kernel = torch.rnn_tanh if acts[0] == "tanh" else torch.rnn_relu
    else:
        default = [a.lower() for a in _DEFAULTS[ctx.op_type]]
        if any(acts[i:i + len(default)] != default for i in range(0, len(acts), len(default))):
            return None
        kernel = torch.lstm if ctx.op_type == "LSTM" else torch.gru
    if lens is not None and not bool((lens == x.shape[0]).all()):
        return None
    return kernel


def _fused(ctx: NodeCtx, kernel, x, w, r, b, states: list[torch.Tensor], layout: int):
    """Run ``kernel`` (torch.lstm / gru / rnn_*) on layout-0 x (T, N, I) for every direction of the node.

    states: h0 (and c0 for LSTM), each (D, N, H). Returns the node's outputs like _finish."""
    n_dir, hidden = w.shape[0], r.shape[-1]
    order = torch.tensor(_TORCH_ORDER[ctx.op_type], device=w.device)
    n_gates = len(order)

    def regate(t: torch.Tensor) -> torch.Tensor:  # (G*H, ...) ONNX gate blocks -> torch order
        return t.reshape(n_gates, hidden, *t.shape[1:]).index_select(0, order).reshape(t.shape)

    params: list[torch.Tensor] = []
    for d in range(n_dir):
        params += [regate(w[d]), regate(r[d])]
        if b is not None:
            half = n_gates * hidden
            params += [regate(b[d, :half]), regate(b[d, half:])]
    hx = states[0] if ctx.op_type != "LSTM" else tuple(states)
    reverse = ctx.attr("direction", "forward") == "reverse"
    xin = x.flip(0) if reverse else x
    res = kernel(xin, hx, params, b is not None, 1, 0.0, False, n_dir == 2, False)
    y = res[0].reshape(x.shape[0], x.shape[1], n_dir, hidden)
    if reverse:
        y = y.flip(0)
    ys = [y[:, :, d] for d in range(n_dir)]
    finals = [tuple(s[d] for s in res[1:]) for d in range(n_dir)]
    return _finish(ctx, ys, finals, layout)


def _zeros(n_dir: int, batch: int, hidden: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(n_dir, batch, hidden, dtype=like.dtype, device=like.device)


@register_op("LSTM", since=7, check=_check)
def _lstm(ctx, x, w, r, b=None, lens=None, h0=None, c0=None, p=None):
    """ONNX LSTM (gates i, o, f, c): see the module docstring for shapes."""
    x, (h0, c0), layout = _prepare(ctx, x, [h0, c0])
    n_dir, hidden = w.shape[0], r.shape[-1]
    acts = _activations(ctx, n_dir)
    clip = _clip(ctx)
    couple = ctx.attr("input_forget", 0) == 1
    h0 = _zeros(n_dir, x.shape[1], hidden, x) if h0 is None else h0
    c0 = _zeros(n_dir, x.shape[1], hidden, x) if c0 is None else c0
    kernel = _fused_kernel(ctx, x, lens, p)
    if kernel is not None:
        return _fused(ctx, kernel, x, w, r, b, [h0, c0], layout)
    seq = _Seq(x, lens)
    ys, finals = [], []
    for d in range(n_dir):
        f, g, h = acts[d]
        rt = r[d].t()
        bias = None if b is None else b[d, :4 * hidden] + b[d, 4 * hidden:]
        xp = torch.matmul(x, w[d].t())
        if bias is not None:
            xp = xp + bias
        pi = po = pf = None
        if p is not None:
            pi, po, pf = p[d].split(hidden)

        def cell(xt, state, f=f, g=g, h=h, rt=rt, pi=pi, po=po, pf=pf):
            h_prev, c_prev = state
            gates = xt + torch.matmul(h_prev, rt)
            gi, go, gf, gc = gates.split(hidden, -1)
            if pi is not None:
                gi = gi + pi * c_prev
                gf = gf + pf * c_prev
            i = f(clip(gi))
            fg = 1 - i if couple else f(clip(gf))
            c = fg * c_prev + i * g(clip(gc))
            if po is not None:
                go = go + po * c
            o = f(clip(go))
            return o * h(c), c

        y, state = _run(cell, seq, xp, (h0[d], c0[d]), reverse=(d == 1 or ctx.attr("direction") == "reverse"))
        ys.append(y)
        finals.append(state)
    return _finish(ctx, ys, finals, layout)


@register_op("GRU", since=7, check=_check)
def _gru(ctx, x, w, r, b=None, lens=None, h0=None):
    """ONNX GRU (gates z, r, h; linear_before_reset 0 or 1): see the module docstring for shapes."""
    x, (h0,), layout = _prepare(ctx, x, [h0])
    n_dir, hidden = w.shape[0], r.shape[-1]
    acts = _activations(ctx, n_dir)
    clip = _clip(ctx)
    before = ctx.attr("linear_before_reset", 0) != 0
    h0 = _zeros(n_dir, x.shape[1], hidden, x) if h0 is None else h0
    kernel = _fused_kernel(ctx, x, lens, None)
    if kernel is not None:
        return _fused(ctx, kernel, x, w, r, b, [h0], layout)
    seq = _Seq(x, lens)
    ys, finals = [], []
    for d in range(n_dir):
        f, g = acts[d]
        r_zr, r_h = r[d, :2 * hidden].t(), r[d, 2 * hidden:].t()
        xp = torch.matmul(x, w[d].t())
        rb_zr = rb_h = None
        if b is not None:
            wb, rb = b[d, :3 * hidden], b[d, 3 * hidden:]
            xp = xp + wb
            rb_zr, rb_h = rb[:2 * hidden], rb[2 * hidden:]

        def cell(xt, state, f=f, g=g, r_zr=r_zr, r_h=r_h, rb_zr=rb_zr, rb_h=rb_h):
            (h_prev,) = state
            x_zr, x_h = xt[..., :2 * hidden], xt[..., 2 * hidden:]
            hr = torch.matmul(h_prev, r_zr)
            if rb_zr is not None:
                hr = hr + rb_zr
            gz, gr = (x_zr + hr).split(hidden, -1)
            z, rg = f(clip(gz)), f(clip(gr))
            if before:
                hh = torch.matmul(h_prev, r_h)
                if rb_h is not None:
                    hh = hh + rb_h
                gh = x_h + rg * hh
            else:
                gh = x_h + torch.matmul(rg * h_prev, r_h)
                if rb_h is not None:
                    gh = gh + rb_h
            ht = g(clip(gh))
            return ((1 - z) * ht + z * h_prev,)

        y, state = _run(cell, seq, xp, (h0[d],), reverse=(d == 1 or ctx.attr("direction") == "reverse"))
        ys.append(y)
        finals.append(state)
    return _finish(ctx, ys, finals, layout)


@register_op("RNN", since=7, check=_check)
def _rnn(ctx, x, w, r, b=None, lens=None, h0=None):
    """ONNX RNN (one gate, default activation Tanh): see the module docstring for shapes."""
    x, (h0,), layout = _prepare(ctx, x, [h0])
    n_dir, hidden = w.shape[0], r.shape[-1]
    acts = _activations(ctx, n_dir)
    clip = _clip(ctx)
    h0 = _zeros(n_dir, x.shape[1], hidden, x) if h0 is None else h0
    kernel = _fused_kernel(ctx, x, lens, None)
    if kernel is not None:
        return _fused(ctx, kernel, x, w, r, b, [h0], layout)
    seq = _Seq(x, lens)
    ys, finals = [], []
    for d in range(n_dir):
        (f,) = acts[d]
        rt = r[d].t()
        xp = torch.matmul(x, w[d].t())
        if b is not None:
            xp = xp + b[d, :hidden] + b[d, hidden:]

        def cell(xt, state, f=f, rt=rt):
            return (f(clip(xt + torch.matmul(state[0], rt))),)

        y, state = _run(cell, seq, xp, (h0[d],), reverse=(d == 1 or ctx.attr("direction") == "reverse"))
        ys.append(y)
        finals.append(state)
    return _finish(ctx, ys, finals, layout)
