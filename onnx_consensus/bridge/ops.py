"""The operator registry of the PyTorch bridge, and the per-node context handed to converters.

A converter is ``fn(ctx: NodeCtx, *inputs: torch.Tensor | None) -> torch.Tensor | tuple``: it receives
the node's inputs as torch tensors (None for an omitted optional input) and returns one tensor, or a
tuple with one entry per node output. Converters are keyed by (domain, op type) and an opset *range*
``[since, until]`` (until=None: open-ended), never by an exact since_version, so a new ONNX revision of an
operator does not break the bridge as long as the range covers it; version-dependent behaviour is read
from ``ctx.opset`` inside the converter.

Families live in ops_nn.py (conv, norms, pooling, activations), ops_math.py (element-wise, reductions)
and ops_tensor.py (shape manipulation); they all register here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx
import torch
from onnx import helper

from ..errors import UnsupportedOperatorError
from ..graph.weights import tensor_array

Converter = Callable[..., Any]


@dataclass
class _Entry:
    since: int
    until: int | None
    fn: Converter
    check: Callable[["NodeCtx"], str | None] | None
    static_inputs: tuple[int, ...]


_REGISTRY: dict[tuple[str, str], list[_Entry]] = {}


def normalize_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def register_op(
    op_type: str,
    since: int = 1,
    until: int | None = None,
    domain: str = "",
    *,
    check: Callable[["NodeCtx"], str | None] | None = None,
    static_inputs: tuple[int, ...] = (),
) -> Callable[[Converter], Converter]:
    """Register ``fn`` for ``op_type`` in ``domain`` for opsets ``since..until`` (inclusive).

    check(ctx) -> reason or None: rejects node configurations the converter cannot handle (reported by
    check_supported like an unsupported operator). static_inputs: input slots holding configuration
    (e.g. Resize scales), never trainable even when they are float tensors of several elements.
    """

    def deco(fn: Converter) -> Converter:
        _REGISTRY.setdefault((normalize_domain(domain), op_type), []).append(
            _Entry(since, until, fn, check, tuple(static_inputs))
        )
        return fn

    return deco


def lookup(op_type: str, domain: str, version: int) -> _Entry | None:
    for e in _REGISTRY.get((normalize_domain(domain), op_type), ()):
        if e.since <= version and (e.until is None or version <= e.until):
            return e
    return None


def opset_versions(model: onnx.ModelProto) -> dict[str, int]:
    return {normalize_domain(o.domain): o.version for o in model.opset_import}


def parse_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """Attribute name -> Python value (bytes decoded to str; tensors to numpy arrays, external ones read from
    their checked, mapped file: ``graph.weights.tensor_array``)."""
    out: dict[str, Any] = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode("utf-8")
        elif isinstance(v, onnx.TensorProto):
            v = np.array(tensor_array(v))
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [s.decode("utf-8") for s in v]
        out[a.name] = v
    return out


class NodeCtx:
    """What a converter knows about its node, fixed at construction.

    attrs: parsed attributes; opset: the node's domain opset version; n_outputs: number of outputs the
    graph asks for (trailing empty names dropped); static: per input, the numpy value when the input is
    a non-trainable constant (else None); cache: converter-private memo (e.g. parsed pads).
    """

    __slots__ = ("node", "name", "op_type", "domain", "opset", "attrs", "n_outputs", "static",
                 "cache", "module")

    def __init__(self, node: onnx.NodeProto, opset: int, static: list[np.ndarray | None], module=None):
        self.node = node
        self.name = node.name or (node.output[0] if node.output else node.op_type)
        self.op_type = node.op_type
        self.domain = normalize_domain(node.domain)
        self.opset = opset
        self.attrs = parse_attributes(node)
        n = len(node.output)
        while n and not node.output[n - 1]:
            n -= 1
        self.n_outputs = n
        self.static = static
        self.cache: dict[str, Any] = {}
        self.module = module

    @property
    def training(self) -> bool:
        return bool(self.module is not None and self.module.training)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def ints(self, i: int, t: torch.Tensor | None) -> list[int] | None:
        """Input ``i`` as a list of Python ints (from the constant when static, else at run time)."""
        if t is None:
            return None
        s = self.static[i] if i < len(self.static) else None
        if s is not None:
            key = f"_ints{i}"
            v = self.cache.get(key)
            if v is None:
                v = self.cache[key] = [int(x) for x in np.asarray(s).reshape(-1)]
            return v
        return [int(x) for x in t.reshape(-1).tolist()]

    def floats(self, i: int, t: torch.Tensor | None) -> list[float] | None:
        if t is None:
            return None
        s = self.static[i] if i < len(self.static) else None
        if s is not None:
            return [float(x) for x in np.asarray(s).reshape(-1)]
        return [float(x) for x in t.reshape(-1).tolist()]


def check_supported(model: onnx.ModelProto) -> None:
    """Raise UnsupportedOperatorError naming every unsupported (op type, domain, opset) of ``model``.

    Nodes inside subgraphs (If/Loop bodies) are visited too; a node configuration a converter rejects
    (e.g. Resize in cubic mode) is reported with its reason.
    """
    _ensure_loaded()
    versions = opset_versions(model)
    problems: dict[str, None] = {}

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            dom = normalize_domain(node.domain)
            ver = versions.get(dom, 1)
            entry = lookup(node.op_type, dom, ver)
            if entry is None:
                problems[f"{node.op_type} (domain '{dom or 'ai.onnx'}', opset {ver})"] = None
            elif entry.check is not None:
                reason = entry.check(NodeCtx(node, ver, []))
                if reason:
                    problems[f"{node.op_type} (domain '{dom or 'ai.onnx'}', opset {ver}: {reason})"] = None
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    visit(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        visit(g)

    visit(model.graph)
    if problems:
        raise UnsupportedOperatorError(
            f"the PyTorch bridge does not support {len(problems)} operator(s): " + ", ".join(problems)
        )


def _ensure_loaded() -> None:
    from . import ops_math, ops_nn, ops_tensor  # noqa: F401  (registration side effects)


# ---------------------------------------------------------------------------------------------------
# dtype helpers shared by the families

_ONNX_TO_TORCH = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.BOOL: torch.bool,
}


def torch_dtype(onnx_type: int) -> torch.dtype:
    try:
        return _ONNX_TO_TORCH[onnx_type]
    except KeyError:
        raise NotImplementedError(f"ONNX tensor type {onnx_type} has no torch equivalent here") from None


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """numpy -> torch, copying (so the graph's numpy data is never aliased)."""
    a = np.asarray(arr)
    if a.dtype == np.uint16 or a.dtype == np.uint32 or a.dtype == np.uint64:
        a = a.astype(np.int64)
    return torch.from_numpy(np.array(a, copy=True))


def static_input_slots(op_type: str, domain: str, version: int) -> tuple[int, ...]:
    e = lookup(op_type, domain, version)
    return e.static_inputs if e is not None else ()
