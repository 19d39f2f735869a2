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

from collections.abc import Iterable

import onnx
from onnx import TensorProto

from .weights import numel

__all__ = ["QUANTIZED_OPS", "QUANT_HEAD_OPS", "QDQ_OPS", "is_runtime_scale", "float_source",
           "finetune_refusal", "quantized_ops", "weight_roles", "stored_bytes", "model_bytes",
           "QUANT_MAC_OPS", "quantized_macs", "drop_requantization", "infer_gather_block_quantized"]

# Op type -> (weight input slots, quantization-parameter input slots). A weight slot counts only when it is an
# initializer (the other operand of MatMulInteger is the activation).
_ROLES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "DequantizeLinear": ((0,), (1, 2)),
    "QuantizeLinear": ((), (1, 2)),
    "ConvInteger": ((1,), (2, 3)),
    "MatMulInteger": ((0, 1), (2, 3)),
    "QLinearConv": ((3, 8), (1, 2, 4, 5, 6, 7)),  # 8: the int32 bias
    "QLinearMatMul": ((0, 3), (1, 2, 4, 5, 6, 7)),
    "QGemm": ((0, 3, 6), (1, 2, 4, 5, 7, 8)),  # 6: the bias
    "MatMulNBits": ((1,), (2, 3)),
    "GatherBlockQuantized": ((0,), (2, 3)),
}
#: Ops that make a graph quantized (QLinear* ops are too, by prefix).
QUANTIZED_OPS = tuple(_ROLES) + ("DynamicQuantizeLinear", "QAttention", "QOrderedMatMul", "DynamicQuantizeLSTM")
_PACKED = ("MatMulNBits", "GatherBlockQuantized")  # uint8 storage holding ``bits``-bit values
_SUB_BYTE = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
             if hasattr(TensorProto, n)}


def quantized_ops(model: onnx.ModelProto) -> list[str]:
    """The quantized op types in ``model``'s main graph, sorted (empty for a float graph)."""
    return sorted({n.op_type for n in model.graph.node
                   if n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear")})


#: Weighted ops of quantized graphs that can make class scores (a classifier head).
QUANT_HEAD_OPS = ("MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "QGemm", "MatMulNBits")
#: Activation (de)quantization: value-preserving up to rounding on the way from a head to the graph output.
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")


def is_runtime_scale(index, t, depth: int = 0) -> bool:
    """Whether tensor ``t`` (gs, with ``index`` a GraphIndex) is a scale computed at run time: output 1 or 2
    (scale, zero point) of a ``DynamicQuantizeLinear``, possibly cast or multiplied by constants or other such
    scales (``quantize_dynamic`` rescales an integer matmul's output by x_scale * w_scale)."""
    if not index.is_data(t):
        return True
    node = index.producer.get(t.name)
    if node is None or depth > 6:
        return False
    if node.op == "DynamicQuantizeLinear":
        return t is not node.outputs[0]
    if node.op in ("Mul", "Cast", "Reshape", "Unsqueeze"):
        return all(is_runtime_scale(index, i, depth + 1) for i in node.inputs[:2 if node.op == "Mul" else 1])
    return False


def float_source(index, name: str) -> str:
    """The float tensor an activation was quantized from: back through ``DynamicQuantizeLinear`` /
    ``QuantizeLinear`` (and a ``DequantizeLinear`` before them) to its input; ``name`` when it is float."""
    node = index.producer.get(name)
    if node is not None and node.op in ("DynamicQuantizeLinear", "QuantizeLinear") and node.inputs:
        return node.inputs[0].name
    return name


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


def weight_roles(nodes: Iterable[onnx.NodeProto], initializers: dict[str, TensorProto]) -> dict[str, int | None]:
    """Initializer name -> number of weight values it stores (a quantized weight), or None (a quantization
    parameter: scale or zero point). Initializers of neither kind are absent."""
    roles: dict[str, int | None] = {}
    nodes = list(nodes)
    runtime_scales = {n.output[1] for n in nodes if n.op_type == "DynamicQuantizeLinear" and len(n.output) > 1}
    for node in nodes:
        if node.op_type == "Mul" and runtime_scales & set(node.input):  # quantize_dynamic: x_scale * w_scale
            roles.update((i, None) for i in node.input if i in initializers)
        spec = _ROLES.get(node.op_type)
        if spec is None and node.op_type.startswith("QLinear"):  # QLinearAdd, QLinearGlobalAveragePool, ...
            spec = ((), tuple(range(len(node.input))))
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
            n = numel(t.dims)
            if node.op_type == "MatMulNBits":
                n = int(_attr(node, "N", 0)) * int(_attr(node, "K", 0)) or n * 8 // int(_attr(node, "bits", 4))
            elif node.op_type in _PACKED and t.data_type == TensorProto.UINT8:
                n = n * 8 // int(_attr(node, "bits", 4))
            roles[node.input[slot]] = n
    return roles


def stored_bytes(t: TensorProto) -> int:
    """Bytes ``t`` takes as stored: its elements x stored bits (int4: half a byte), rounded up (a uint8 tensor
    packing 4-bit values: its bytes)."""
    return (numel(t.dims) * _bits(t) + 7) // 8


def model_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers as stored (a uint8-packed int4 weight: its bytes)."""
    return sum(stored_bytes(t) for t in model.graph.initializer)


def _sym_shape(sym, name: str) -> list:
    """The shape SymbolicShapeInference ``sym`` knows for tensor ``name`` (its ``known_vi_``, else the
    initializer's dims): ints, symbol names, None where unknown."""
    if name in sym.known_vi_:
        return [getattr(d, d.WhichOneof("value")) if d.WhichOneof("value") else None
                for d in sym.known_vi_[name].type.tensor_type.shape.dim]
    return list(sym.initializers_[name].dims)


def infer_gather_block_quantized(sym, node) -> None:
    """Shape rule for ``GatherBlockQuantized`` in onnxruntime's SymbolicShapeInference (``sym``; its own rule
    takes the uint8-packed data's last dim, half the real one at 4 bits, and then fails on the MatMulNBits
    that reads the result): indices' shape + the data's remaining dims, the last one unpacked."""
    data, idx = _sym_shape(sym, node.input[0]), _sym_shape(sym, node.input[1])
    axis = int(_attr(node, "gather_axis", 0)) % len(data)
    dims = list(data[:axis]) + list(idx) + list(data[axis + 1:])
    if sym.known_vi_[node.input[0]].type.tensor_type.elem_type == TensorProto.UINT8 and isinstance(dims[-1], int):
        dims[-1] = dims[-1] * 8 // int(_attr(node, "bits", 4))
    elem = sym.known_vi_[node.input[2]].type.tensor_type.elem_type  # the scales' type: the output's
    sym.known_vi_[node.output[0]].CopyFrom(onnx.helper.make_tensor_value_info(node.output[0], elem, dims))


#: com.microsoft ops whose MACs ``quantized_macs`` counts.
QUANT_MAC_OPS = ("MatMulNBits", "QGemm")


def quantized_macs(node: onnx.NodeProto, shapes: dict) -> int | None:
    """MACs of a com.microsoft quantized matmul (``MatMulNBits``: prod(A[:-1]) x N x K; ``QGemm``: M x N x K);
    0 for other ops; None when a shape is unknown."""
    if node.op_type == "MatMulNBits":
        a = shapes.get(node.input[0])
        if a is None or any(d is None for d in a):
            return None
        return numel(a[:-1]) * int(_attr(node, "N", 0)) * int(_attr(node, "K", 0))
    if node.op_type == "QGemm":
        a, b = shapes.get(node.input[0]), shapes.get(node.input[3])
        if a is None or b is None or any(d is None for d in (*a, *b)):
            return None
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
        return int(m) * int(k) * int(b[0] if _attr(node, "transB", 0) else b[1])
    return 0


def drop_requantization(graph, entries: Iterable[str]) -> int:
    """Remove the re-quantization a block removal leaves in a QDQ graph (onnx-graphsurgeon ``graph``, in place).

    A removed block's exit was a float tensor quantized for the next block (``Q_exit -> DQ_exit``); once its
    entry (the dequantized ``DQ_entry`` output) replaces the exit, the chain reads ``DQ_entry -> Q_exit ->
    DQ_exit``: the entry's values rounded a second time on the exit's scale. Every read of such a ``DQ_exit``
    output becomes a read of the ``DQ_entry`` output, so the next block gets the entry exactly as the removed
    block did, with the entry's own scale and zero point (the dead ``Q_exit``/``DQ_exit`` go at cleanup).
    Only chains starting at one of ``entries`` are touched, never a graph output. Returns the number dropped."""
    entries = set(entries)
    outputs = {t.name for t in graph.outputs}
    dropped = 0
    for q in list(graph.nodes):
        if q.op != "QuantizeLinear" or not q.inputs or q.inputs[0].name not in entries:
            continue
        src = q.inputs[0]
        if not src.inputs or src.inputs[0].op != "DequantizeLinear":
            continue
        for dq in list(q.outputs[0].outputs):
            out = dq.outputs[0]
            if dq.op != "DequantizeLinear" or out.name in outputs or out.dtype != src.dtype:
                continue
            for consumer in list(out.outputs):
                for k, t in enumerate(consumer.inputs):
                    if t is out:
                        consumer.inputs[k] = src
            dropped += 1
    return dropped
