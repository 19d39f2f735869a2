"""Small transformers for tests and experiments of the bridge and the pruner.

* ``TinyViT``: pre-LN vision transformer for (N, 1, 28, 28) float32 images with 4x4 or 7x7 patches, a
  class token, learned position embeddings and optional layer scale -> (N, classes) logits.
* ``PostLNEncoder``: token classifier built on ``torch.nn.TransformerEncoder`` (norm_first=False, i.e.
  post-LN): input_ids (N, L) int64 + padding_mask (N, L) bool (True = padding) -> (N, classes) logits,
  masked mean pooling over the non-padding tokens.
* ``PreLNDecoder``: decoder-only pre-LN language model with a causal mask: input_ids (N, L) int64 ->
  (N, L, vocab) logits.

Each model carries ``input_names``, ``output_names``, ``example_inputs(batch, seq)`` and its dynamic axes;
``export_onnx`` exports with torch's classic exporter (opset 17, dynamic batch and sequence axes) or the
dynamo exporter (opset 18).

Known limitation (torch, not this module): the classic exporter traces nn.MultiheadAttention's
``q.view(tgt_len, ...)`` with the example's sequence length as a constant, so the classic export of
``PostLNEncoder`` has a dynamic batch axis but only runs at the export sequence length; its dynamo export
is dynamic in both. The hand-written attention of TinyViT / PreLNDecoder exports dynamically either way.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention; x (N, L, D), additive mask broadcastable to (N, H, L, L) or None."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim // heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, length, d = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        if mask is not None:
            att = att + mask
        att = torch.softmax(att, dim=-1)
        out = torch.matmul(att, v).transpose(1, 2).reshape(n, length, d)
        return self.proj(out)


class PreLNBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2, layer_scale: float | None = None):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), layer_scale))
            self.gamma2 = nn.Parameter(torch.full((dim,), layer_scale))
        else:
            self.gamma1 = self.gamma2 = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attn(self.ln1(x), mask)
        x = x + (a * self.gamma1 if self.gamma1 is not None else a)
        m = self.mlp(self.ln2(x))
        return x + (m * self.gamma2 if self.gamma2 is not None else m)


class TinyViT(nn.Module):
    input_names = ["image"]
    output_names = ["logits"]
    dynamic_axes = {"image": {0: "batch"}, "logits": {0: "batch"}}

    def __init__(self, patch: int = 7, dim: int = 64, depth: int = 4, heads: int = 4, num_classes: int = 10,
                 layer_scale: float | None = 0.1, image_size: int = 28, in_channels: int = 1):
        super().__init__()
        if image_size % patch:
            raise ValueError("patch must divide the image size")
        self.image_size, self.in_channels = image_size, in_channels
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        tokens = (image_size // patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(PreLNBlock(dim, heads, 2, layer_scale) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(image).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])

    def example_inputs(self, batch: int = 2, seq: int | None = None) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, self.in_channels, self.image_size, self.image_size),)

    def dynamo_shapes(self):
        return {"image": {0: torch.export.Dim("batch", min=1, max=4096)}}


class PostLNEncoder(nn.Module):
    input_names = ["input_ids", "padding_mask"]
    output_names = ["logits"]
    dynamic_axes = {"input_ids": {0: "batch", 1: "seq"}, "padding_mask": {0: "batch", 1: "seq"},
                    "logits": {0: "batch"}}

    def __init__(self, vocab: int = 100, dim: int = 64, heads: int = 4, depth: int = 2, ff: int = 128,
                 max_len: int = 64, num_classes: int | None = 4, use_mask: bool = True):
        super().__init__()
        self.vocab, self.max_len, self.use_mask = vocab, max_len, use_mask
        if num_classes is None:  # headless: the L2-normalised mean-pooled embedding, as sentence embedders do
            self.output_names = ["embedding"]
        if not use_mask:  # input_ids only; mean pooling over every token
            self.input_names = ["input_ids"]
        self.dynamic_axes = {**{k: v for k, v in self.dynamic_axes.items() if k in self.input_names},
                             self.output_names[0]: {0: "batch"}}
        self.embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes) if num_classes is not None else None

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        length = input_ids.shape[1]
        x = self.embed(input_ids) + self.pos_embed[:, :length]
        if padding_mask is None:
            x = self.encoder(x).mean(1)
        else:
            x = self.encoder(x, src_key_padding_mask=padding_mask)
            keep = (~padding_mask).unsqueeze(-1).to(x.dtype)
            x = (x * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        if self.head is None:
            return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-9)
        return self.head(x)

    def example_inputs(self, batch: int = 2, seq: int | None = 12) -> tuple[torch.Tensor, ...]:
        seq = seq or 12
        ids = torch.randint(0, self.vocab, (batch, seq))
        lengths = torch.randint(1, seq + 1, (batch,))
        lengths[0] = seq
        mask = torch.arange(seq)[None, :] >= lengths[:, None]
        return (ids, mask) if self.use_mask else (ids,)

    def dynamo_shapes(self):
        b = torch.export.Dim("batch", min=1, max=4096)
        s = torch.export.Dim("seq", min=2, max=self.max_len)
        if not self.use_mask:
            return {"input_ids": {0: b, 1: s}}
        return {"input_ids": {0: b, 1: s}, "padding_mask": {0: b, 1: s}}


class PreLNDecoder(nn.Module):
    input_names = ["input_ids"]
    output_names = ["logits"]
    dynamic_axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}

    def __init__(self, vocab: int = 100, dim: int = 64, heads: int = 4, depth: int = 2, max_len: int = 64):
        super().__init__()
        self.vocab, self.max_len = vocab, max_len
        self.embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(PreLNBlock(dim, heads, 4, None) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        x = self.embed(input_ids) + self.pos_embed[:, :length]
        ones = torch.ones(length, length, dtype=torch.bool, device=input_ids.device)
        mask = torch.zeros(length, length, device=x.device).masked_fill(torch.triu(ones, 1), float("-inf"))
        for blk in self.blocks:
            x = blk(x, mask)
        return self.head(self.norm(x))

    def example_inputs(self, batch: int = 2, seq: int | None = 12) -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, self.vocab, (batch, seq or 12)),)

    def dynamo_shapes(self):
        return {"input_ids": {0: torch.export.Dim("batch", min=1, max=4096),
                              1: torch.export.Dim("seq", min=2, max=self.max_len)}}


def export_onnx(model: nn.Module, path: str, *, dynamo: bool = False, opset: int | None = None,
                batch: int = 2, seq: int | None = None) -> str:
    """Export ``model`` (put in eval mode) to ``path``; classic exporter at opset 17 by default (dynamic
    batch and sequence axes), dynamo exporter at opset 18 (same dynamic axes, as torch.export Dims)."""
    model = model.eval()
    args = model.example_inputs(batch, seq)
    if dynamo:
        prog = torch.onnx.export(model, args, dynamo=True, opset_version=max(opset or 18, 18),
                                 input_names=model.input_names, output_names=model.output_names,
                                 dynamic_shapes=model.dynamo_shapes())
        prog.save(path)
        return path
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused encoder-layer kernel has no ONNX form
    try:
        with torch.no_grad():
            torch.onnx.export(model, args, path, dynamo=False, opset_version=opset or 17,
                              input_names=model.input_names, output_names=model.output_names,
                              dynamic_axes=model.dynamic_axes, do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return path
