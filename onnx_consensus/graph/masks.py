"""Token masks: which graph inputs mark the tokens a feature average keeps, and which value means "keep".

A token tensor (N, T, D) is pooled to (N, D) over the tokens a mask input (N, T) keeps (``pool_features``).
Two conventions exist: ``keep`` (nonzero = a real token: Hugging Face's ``attention_mask``) and ``pad``
(nonzero / True = padding: torch's ``src_key_padding_mask``). Which one an input follows is decided, in order:

1. an override ``NAME:keep|pad`` (``--token-mask``);
2. the graph's structure: the input's values are followed through the ops that carry them elementwise
   (Cast, Not, Unsqueeze/Reshape/Expand, arithmetic and comparisons with a uniform constant, Where between
   two constants), evaluated at the two mask values 0/False and 1/True, until they meet the data path:
   an ``Add`` of a bias of <= -1e3 (-inf, -1e4, finfo.min) for one value and about 0 for the other (an
   additive attention mask: the value giving the large negative bias marks padding), a ``Where`` choosing
   between data and a constant that is <= -1e3 or 0 (the value selecting the constant marks padding), or a
   ``Mul`` by 0 for one value and 1 for the other (zeroed tokens: the value giving 0 marks padding). Every
   such use must agree; the decision is logged at info level;
3. the input's name, as a fall-back logged as a warning: a name containing ``mask`` is a mask, and it marks
   padding when the name also contains ``pad``, else kept tokens.
At scoring time an input is used as a mask only when its batch is (N, T) of the token tensor and its values
are bool or 0/1.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import InputError
from .ir import GraphIndex, to_gs

log = logging.getLogger("onnx_consensus")
POLARITIES = ("keep", "pad")
NEG_LARGE = -1e3  # an additive bias at or below this removes a token from a softmax
CARRY_OPS = ("Identity", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Transpose", "Tile", "Flatten", "Slice",
             "Gather")
_BINARY = {
    "Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b, "Div": lambda a, b: a / b,
    "Pow": lambda a, b: a ** b, "Max": max, "Min": min,
    "Equal": lambda a, b: float(a == b), "Greater": lambda a, b: float(a > b), "Less": lambda a, b: float(a < b),
    "GreaterOrEqual": lambda a, b: float(a >= b), "LessOrEqual": lambda a, b: float(a <= b),
    "And": lambda a, b: float(bool(a) and bool(b)), "Or": lambda a, b: float(bool(a) or bool(b)),
    "Xor": lambda a, b: float(bool(a) != bool(b)),
}
_INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
              onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


@dataclass(frozen=True)
class TokenMask:
    """A mask input. polarity: "keep" (nonzero = a real token) or "pad" (nonzero = padding); source:
    "override", "structure" or "name" (how the polarity was decided)."""

    name: str
    polarity: str
    source: str

    def keep(self, value: np.ndarray) -> np.ndarray | None:
        """(N, T) bool, True for kept tokens; None when ``value`` is not a 0/1 or bool (N, T) array."""
        value = np.asarray(value)
        if value.ndim != 2 or not (value.dtype == bool or np.isin(value, (0, 1)).all()):
            return None
        return value == 0 if self.polarity == "pad" else value != 0


def parse_token_mask(specs: Sequence[str]) -> dict[str, str]:
    """``("NAME:keep", "NAME2:pad")`` -> {NAME: "keep", NAME2: "pad"}; a malformed spec raises InputError."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, polarity = spec.rpartition(":")
        if not sep or not name or polarity not in POLARITIES:
            raise InputError(f"--token-mask {spec!r}: expected NAME:keep or NAME:pad")
        out[name] = polarity
    return out


def token_masks(model: onnx.ModelProto, overrides: Sequence[str] = ()) -> dict[str, TokenMask]:
    """The token-mask inputs of ``model`` (input name -> TokenMask): overrides, then the structural test,
    then names (see the module docstring). An override naming no input of the model raises InputError."""
    forced = parse_token_mask(overrides)
    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    unknown = sorted(set(forced) - {v.name for v in inputs})
    if unknown:
        raise InputError(f"--token-mask: {', '.join(unknown)} is not an input of the model "
                         f"(inputs: {', '.join(v.name for v in inputs)})")
    found = {name: TokenMask(name, p, "override") for name, p in forced.items()}
    candidates = [v.name for v in inputs if v.name not in forced and _rank(v) in (None, 2)]
    if not candidates:
        return found
    index = GraphIndex(to_gs(model, infer=False))
    for name in candidates:
        verdicts = _structural(index, name)
        if len(verdicts) == 1:
            polarity = verdicts.pop()
            found[name] = TokenMask(name, polarity, "structure")
            log.info("token mask %s: nonzero = %s (from the graph: how its values reach the data path)", name,
                     "kept token" if polarity == "keep" else "padding")
            continue
        if "mask" in name.lower():
            polarity = "pad" if "pad" in name.lower() else "keep"
            found[name] = TokenMask(name, polarity, "name")
            why = "its uses disagree" if verdicts else "no use of it in the graph shows which value masks"
            log.warning("token mask %s: nonzero = %s, guessed from its name (%s); say --token-mask %s:keep|pad "
                        "if that is wrong", name, "kept token" if polarity == "keep" else "padding", why, name)
    return found


def _rank(v: onnx.ValueInfoProto) -> int | None:
    t = v.type.tensor_type
    return len(t.shape.dim) if t.HasField("shape") else None


def _structural(index: GraphIndex, name: str) -> set[str]:
    """Polarities ("keep"/"pad") implied by every use of input ``name`` that reaches the data path."""
    verdicts: set[str] = set()
    stack: list[tuple[str, tuple[float, float]]] = [(name, (0.0, 1.0))]
    seen: set[tuple[int, str]] = set()
    while stack:
        t, pair = stack.pop()
        for node in index.consumers(t):
            if (id(node), t) in seen:
                continue
            seen.add((id(node), t))
            try:
                step = _step(index, node, t, pair)
            except (ArithmeticError, ValueError, TypeError):
                step = None
            if step is None:
                continue
            kind, value = step
            if kind == "verdict":
                verdicts.add(value)
            elif not any(math.isnan(v) for v in value) and value[0] != value[1]:
                stack.append((node.outputs[0].name, value))
    return verdicts


def _step(index: GraphIndex, node: gs.Node, t: str, pair: tuple[float, float]):
    """("carry", values of the node's output at mask 0 and 1), ("verdict", polarity), or None."""
    pos = next((i for i, x in enumerate(node.inputs) if x.name == t), None)
    if pos is None:
        return None
    op = node.op
    if op in CARRY_OPS:
        return ("carry", pair) if pos == 0 else None
    if op == "Cast":
        to = node.attrs.get("to")
        if to == onnx.TensorProto.BOOL:
            return "carry", tuple(float(v != 0) for v in pair)
        return "carry", tuple(float(math.trunc(v)) if to in _INT_TYPES and math.isfinite(v) else v for v in pair)
    if op == "Not":
        return "carry", tuple(float(v == 0) for v in pair)
    if op == "Neg":
        return "carry", tuple(-v for v in pair)
    if op == "Where":
        return _where(index, node, pos, pair)
    if op not in _BINARY or len(node.inputs) != 2:
        return None
    other = node.inputs[1 - pos]
    c = _uniform(index, other)
    if c is not None:
        f = _BINARY[op]
        return "carry", tuple(float(f(v, c) if pos == 0 else f(c, v)) for v in pair)
    if not index.is_data(other):
        return None
    bias = pair if op == "Add" else tuple(-v for v in pair) if op == "Sub" and pos == 1 else None
    if bias is not None:
        return _pad_value(bias, lambda v: v <= NEG_LARGE, lambda v: abs(v) <= 1.0)
    if op == "Mul":
        return _pad_value(pair, lambda v: v == 0, lambda v: v == 1)
    return None


def _where(index: GraphIndex, node: gs.Node, pos: int, pair: tuple[float, float]):
    if pos != 0 or len(node.inputs) != 3:
        return None
    x, y = node.inputs[1], node.inputs[2]
    cx, cy = _uniform(index, x), _uniform(index, y)
    if cx is not None and cy is not None:
        return "carry", tuple(cx if v else cy for v in pair)
    if bool(pair[0]) == bool(pair[1]):
        return None
    for const, when_true in ((cx, True), (cy, False)):
        if const is not None and (const <= NEG_LARGE or const == 0):
            selecting = 1 if bool(pair[1]) == when_true else 0  # the mask value that selects the constant
            return "verdict", "pad" if selecting == 1 else "keep"
    return None


def _pad_value(values: tuple[float, float], is_pad, is_keep):
    """The verdict when exactly one of the values (at mask 0, mask 1) masks the token and the other keeps it."""
    if is_pad(values[1]) and is_keep(values[0]):
        return "verdict", "pad"
    if is_pad(values[0]) and is_keep(values[1]):
        return "verdict", "keep"
    return None


def _uniform(index: GraphIndex, t: gs.Tensor, depth: int = 0) -> float | None:
    """The single value every element of ``t`` holds, when ``t`` is a constant (initializer, Constant,
    ConstantOfShape, or one of those reshaped / expanded / cast); else None."""
    if depth > 8:
        return None
    if isinstance(t, gs.Constant):
        return _single(t)
    node = index.producer.get(t.name)
    if node is None:
        return None
    if node.op == "Constant":
        value = node.attrs.get("value")
        if isinstance(value, gs.Constant):
            return _single(value)
        for key in ("value_float", "value_int"):
            if key in node.attrs:
                return float(node.attrs[key])
        return None
    if node.op == "ConstantOfShape":
        value = node.attrs.get("value")
        return 0.0 if value is None else _single(value) if isinstance(value, gs.Constant) else None
    if node.op in CARRY_OPS + ("Cast",) and node.inputs:
        v = _uniform(index, node.inputs[0], depth + 1)
        if v is not None and node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.BOOL:
            return float(v != 0)
        return v
    return None


def _single(c: gs.Constant) -> float | None:
    shape = c.shape or ()
    if int(np.prod(shape)) > 4096:
        return None
    try:
        values = np.asarray(c.values)
    except Exception:  # a weight stub without data
        return None
    if values.size == 0 or not np.issubdtype(values.dtype, np.number) and values.dtype != bool:
        return None
    first = values.flat[0]
    return float(first) if (values == first).all() else None
