"""Quantized graphs: which initializers are quantized weights and which are quantization parameters, their
stored sizes, the MACs of the quantized ops outside the default domain, and what a pruned QDQ graph keeps.

Formats recognised (as onnxruntime.quantization and the onnxruntime-genai builder write them):

* QDQ (``quantize_static``): int8/uint8/int16/int4 weights read by ``DequantizeLinear``; activations pass
  through ``QuantizeLinear`` -> ``DequantizeLinear`` pairs; the float ops in between are the model's own.
* QOperator and dynamic quantization (``quantize_dynamic``): ``ConvInteger`` / ``MatMulInteger`` on int8
  weights with ``DynamicQuantizeLinear`` on the activations; ``QLinearConv`` / ``QLinearMatMul`` / ``QGemm``.
* Weight-only blocks (``matmul_nbits_quantizer``, the genai builder's int4): ``MatMulNBits`` (B packed
  ``bits`` per value, ``N`` x ``K`` values), ``GatherBlockQuantized`` (embeddings).

A quantized weight counts as one parameter per value and ``bits / 8`` bytes per value; scales and zero points
count as bytes, not as parameters.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import onnx
from onnx import TensorProto

__all__ = ["QUANTIZED_OPS", "is_quantized", "finetune_refusal", "quantized_ops", "weight_roles", "stored_bytes", "model_bytes",
           "quantized_macs", "requantized_pairs"]

# Op type -> (weight input slots, quantization-parameter input slots). A weight slot counts only when it is an
# initializer (the other operand of MatMulInteger is the activation).
_ROLES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "DequantizeLinear": ((0,), (1, 2)),
    "QuantizeLinear": ((), (1, 2)),
    "ConvInteger": ((1,), (2, 3)),
    "MatMulInteger": ((0, 1), (2, 3)),
    "QLinearConv": ((3,), (1, 2, 4, 5, 6, 7)),
    "QLinearMatMul": ((0, 3), (1, 2, 4, 5, 6, 7)),
    "QGemm": ((0, 3), (1, 2, 4, 5, 7, 8)),
    "MatMulNBits": ((1,), (2, 3)),
    "GatherBlockQuantized": ((0,), (2, 3)),
}
#: Ops that make a graph quantized (QLinear* ops are too, by prefix).
QUANTIZED_OPS = tuple(_ROLES) + ("DynamicQuantizeLinear", "QAttention", "QOrderedMatMul", "DynamicQuantizeLSTM")
_PACKED = ("MatMulNBits", "GatherBlockQuantized")  # uint8 storage holding ``bits``-bit values
_SUB_BYTE = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2") if hasattr(TensorProto, n)}


def quantized_ops(model: onnx.ModelProto) -> list[str]:
    """The quantized op types in ``model``'s main graph, sorted (empty for a float graph)."""
    return sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear")})


def is_quantized(model: onnx.ModelProto) -> bool:
    return bool(quantized_ops(model))


def finetune_refusal(ops: Iterable[str]) -> str:
    """The one line refusing to fine-tune a graph with the quantized ``ops``, saying what to do instead."""
    return (f"fine-tuning a quantized graph ({', '.join(ops)}) is not supported: prune the float model, fine-tune "
            "it, then quantize it (or prune this one without fine-tuning)")


def _attr(node: onnx.NodeProto, name: str, default):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _bits(t: TensorProto) -> int:
    """Stored bits per element of ``t``'s type."""
    if t.data_type in _SUB_BYTE:
        return 2 if "2" in TensorProto.DataType.Name(t.data_type)[-2:] else 4
    return onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * 8


def _numel(dims) -> int:
    return int(math.prod(int(d) for d in dims))


def weight_roles(nodes: Iterable[onnx.NodeProto], initializers: dict[str, TensorProto]) -> dict[str, int | None]:
    """Initializer name -> number of weight values it stores (a quantized weight), or None (a quantization
    parameter: scale or zero point). Initializers of neither kind are absent."""
    roles: dict[str, int | None] = {}
    for node in nodes:
        spec = _ROLES.get(node.op_type)
        if spec is None:
            continue
        weights, qparams = spec
        for slot in qparams:
            if slot < len(node.input) and node.input[slot] in initializers:
                roles.setdefault(node.input[slot], None)
        for slot in weights:
            t = initializers.get(node.input[slot]) if slot < len(node.input) else None
            if t is None:
                continue
            n = _numel(t.dims)
            if node.op_type == "MatMulNBits":
                n = int(_attr(node, "N", 0)) * int(_attr(node, "K", 0)) or n * 8 // int(_attr(node, "bits", 4))
            elif node.op_type in _PACKED and t.data_type == TensorProto.UINT8:
                n = n * 8 // int(_attr(node, "bits", 4))
            roles[node.input[slot]] = n
    return roles


def stored_bytes(t: TensorProto, values: int | None = None, bits: int | None = None) -> int:
    """Bytes ``t`` takes as stored: its elements x stored bits (int4: half a byte), rounded up. ``values`` and
    ``bits``: a packed tensor's value count and bits per value instead."""
    n = _numel(t.dims) if values is None else values
    return (n * (bits or _bits(t)) + 7) // 8


def model_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers as stored (a uint8-packed int4 weight: its bytes)."""
    return sum(stored_bytes(t) for t in model.graph.initializer)


def quantized_macs(node: onnx.NodeProto, shapes: dict) -> int | None:
    """MACs of a com.microsoft quantized matmul (``MatMulNBits``: prod(A[:-1]) x N x K; ``QGemm``: M x N x K);
    0 for other ops of that domain this module knows; None when a shape is unknown."""
    if node.op_type == "MatMulNBits":
        a = shapes.get(node.input[0])
        if a is None or any(d is None for d in a):
            return None
        return _numel(a[:-1]) * int(_attr(node, "N", 0)) * int(_attr(node, "K", 0))
    if node.op_type == "QGemm":
        a, b = shapes.get(node.input[0]), shapes.get(node.input[3])
        if a is None or b is None or any(d is None for d in (*a, *b)):
            return None
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
        return int(m) * int(k) * int(b[0] if _attr(node, "transB", 0) else b[1])
    return 0


def requantized_pairs(graph) -> list:
    """``DequantizeLinear -> QuantizeLinear -> DequantizeLinear`` chains in an onnx-graphsurgeon graph, as
    (dq_in, q, dq_out) nodes: what a removed block leaves when its entry (a dequantized tensor) takes the
    place of its exit (a float tensor that was quantized again)."""
    out = []
    for q in graph.nodes:
        if q.op != "QuantizeLinear" or not q.inputs or not q.inputs[0].inputs:
            continue
        dq_in = q.inputs[0].inputs[0]
        if dq_in.op != "DequantizeLinear":
            continue
        for dq_out in list(q.outputs[0].outputs):
            if dq_out.op == "DequantizeLinear":
                out.append((dq_in, q, dq_out))
    return out
