"""The sizes of a decoder's KV-cache inputs when the export leaves some of them symbolic.

A cache input is declared (batch, kv_heads, past_length, head_size). Batch and past length are the run's to
choose; the other two are fixed by the model, but recent exporters write some of them as symbols (the
onnxruntime-genai builder 0.18 writes the head size as ``kv_cache_dim``). They are read, in order, from:

1. the declaration itself, when it is an integer;
2. the graph's own weights: the attention node that reads the cache (``GroupQueryAttention``,
   ``MultiHeadAttention``; com.microsoft) has its head counts as attributes and the width of its query
   input follows from the projection that makes it (a ``MatMul`` initializer's last dim, a ``MatMulNBits``'s
   ``N``, a ``MatMulInteger``'s int8 weight, through a bias ``Add``, a scale ``Mul`` and value-preserving
   hops): head_size = width / heads;
3. ``genai_config.json`` beside the model (``model.decoder.head_size`` / ``num_key_value_heads``), when
   the caller passes it.
"""
from __future__ import annotations


import onnx

from ..errors import InputError

__all__ = ["cache_dims", "symbolic_cache_dims", "token_shapes"]

_MS_ATTENTION = ("GroupQueryAttention", "MultiHeadAttention")
_HOPS = ("Cast", "Identity")


def cache_dims(model: onnx.ModelProto, names: list[str], config: dict[str, int] | None = None
               ) -> dict[str, tuple[int, int]]:
    """(kv_heads, head_size) of each cache input in ``names`` (4-D, declared (batch, kv_heads, past, head)).

    config: dims read from genai_config.json (``llm.folder_formats.genai_dims``), used where the declaration and the graph say
    nothing. Raises InputError naming the input when a size stays unknown."""
    declared = {vi.name: vi for vi in model.graph.input}
    graph = _GraphView(model)
    out = {}
    for name in names:
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in declared[name].type.tensor_type.shape.dim]
        heads, head = (dims[1], dims[3]) if len(dims) == 4 else (None, None)
        if heads is None or head is None:
            g_heads, g_head = graph.attention_dims(name)
            heads = heads or g_heads or (config or {}).get("kv_heads")
            head = head or g_head or (config or {}).get("head_size")
        if heads is None or head is None:
            raise InputError(f"cannot size cache input {name}: dims {dims} (the head count and head size are "
                             f"neither declared, nor read from the attention that uses it, nor in genai_config.json)")
        out[name] = (int(heads), int(head))
    return out


def symbolic_cache_dims(model: onnx.ModelProto, config: dict[str, int] | None = None) -> dict[str, tuple[int, int]]:
    """``cache_dims`` of the 4-D graph inputs whose head count or head size is symbolic ({} when none is)."""
    inits = {t.name for t in model.graph.initializer}
    unsized = []
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name not in inits and len(dims) == 4 and not (dims[1].HasField("dim_value")
                                                            and dims[3].HasField("dim_value")):
            unsized.append(vi.name)
    return cache_dims(model, unsized, config) if unsized else {}


class _GraphView:
    """Producers, consumers and initializer dims of a model's main graph (built once per ``cache_dims``)."""

    def __init__(self, model: onnx.ModelProto):
        self.producer = {o: n for n in model.graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.init_dims = {t.name: list(t.dims) for t in model.graph.initializer}

    def attention_dims(self, cache_input: str) -> tuple[int | None, int | None]:
        """(kv_heads, head_size) from the attention node reading ``cache_input`` (None where unknown), directly
        or through value-preserving hops (fp16 models: the float32 cache cast to float16)."""
        for node in self._readers(cache_input):
            if node.op_type not in _MS_ATTENTION:
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            q_heads = attrs.get("num_heads")
            kv_heads = attrs.get("kv_num_heads", q_heads)
            width = self.width(node.input[0]) if node.input else None
            if not (q_heads and kv_heads and width):
                return kv_heads, None
            packed = len(node.input) < 2 or not node.input[1]  # query, key and value in one tensor
            parts = q_heads + 2 * kv_heads if packed else q_heads
            return kv_heads, (width // parts if width % parts == 0 else None)
        return None, None

    def _readers(self, name: str, depth: int = 0) -> list[onnx.NodeProto]:
        out = []
        for node in self.consumers.get(name, []):
            if node.op_type in _HOPS and depth < 8:
                out += [r for o in node.output for r in self._readers(o, depth + 1)]
            else:
                out.append(node)
        return out

    def width(self, name: str, depth: int = 0) -> int | None:
        """The last dim of tensor ``name`` as its projection makes it, or None."""
        node = self.producer.get(name)
        if node is None or depth > 8:
            return None
        if node.op_type == "MatMulNBits":
            return next((a.i for a in node.attribute if a.name == "N"), None)
        if node.op_type in ("MatMul", "MatMulInteger") and node.input[1] in self.init_dims:
            return int(self.init_dims[node.input[1]][-1])
        if node.op_type in _HOPS:
            return self.width(node.input[0], depth + 1)
        if node.op_type == "Add":  # a bias: the operand that is not an initializer carries the width
            data = [i for i in node.input if i not in self.init_dims]
            return self.width(data[0], depth + 1) if len(data) == 1 else None
        if node.op_type == "Mul":  # dynamic int8: MatMulInteger -> Cast -> Mul(runtime scale): the operand with a width
            return next((w for w in (self.width(i, depth + 1) for i in node.input if i not in self.init_dims) if w),
                        None)
        return None


def token_shapes(model: onnx.ModelProto, config: dict[str, int] | None = None) -> dict[str, tuple[int, ...]]:
    """Input shapes of one decoding step from scratch: batch 1, one token (2-D inputs (1, 1)), empty cache
    (4-D inputs (1, kv_heads, 0, head_size)): the shapes MACs per token are counted at."""
    inits = {t.name for t in model.graph.initializer}
    sized = symbolic_cache_dims(model, config)
    shapes = {}
    for vi in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if vi.name in inits:
            continue
        if len(dims) == 2:
            shapes[vi.name] = (1, 1)
        elif len(dims) == 4:
            heads, head = sized.get(vi.name, (dims[1], dims[3]))
            shapes[vi.name] = (1, heads, 0, head)
    return shapes
