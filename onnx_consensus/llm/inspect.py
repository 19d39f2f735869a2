"""``inspect`` of a decoder LLM with a KV cache: its layers, parameters, stored bytes and MACs per token."""
from __future__ import annotations

import os

import onnx

from ..errors import InputError
from ..graph.decoder import find_decoder_layers
from ..graph.flops import count_cost
from ..graph.kv_dims import token_shapes
from .folder_formats import genai_dims

__all__ = ["inspect_decoder"]


def inspect_decoder(path: str, model: onnx.ModelProto) -> dict:
    """``inspect`` of a decoder with a KV cache: its layers, with MACs per token (batch 1, one token, an empty
    cache: the weight matmuls; the attention over the cache grows with the context and is not counted)."""
    notes = []
    try:
        cost = count_cost(model, token_shapes(model, genai_dims(os.path.dirname(os.path.abspath(path)))))
        notes.append("MACs per token: batch 1, one token, an empty cache (the attention over a cache is not counted)")
    except InputError as exc:
        cost = count_cost(model, {})
        notes.append(f"MACs not counted: {exc}")
    rep = find_decoder_layers(model, macs_per_node=cost.macs_per_node)
    total = cost.total_macs
    blocks = [dict(layer.to_json(), macs_share=(layer.block.macs / total) if layer.block.macs is not None and total
                   else None) for layer in rep.layers]
    return {"model": os.fspath(path), "macs": total, "params": cost.params, "weight_bytes": cost.weight_bytes,
            "unit": "decoder layer", "blocks": blocks, "not_removable": [], "notes": list(rep.notes) + notes,
            "feature": None, "outputs": {}}
