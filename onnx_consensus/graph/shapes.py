"""Shape inference shared by block detection (``ir.to_gs``) and MAC counting (``flops.count_cost``).

One function, ``infer_shapes``, tries in a fixed order and stops as soon as the caller has what it needs:

1. the shapes the model declares (graph inputs, outputs, value_info);
2. ONNX shape inference (``strict_mode=False``, with data propagation; without it if that fails);
3. onnxruntime's symbolic shape inference (sympy), run on the result of 2. It resolves what ONNX's
   inference leaves unknown (a Paddle export's reshapes computed from ``Shape``, an attention head size
   computed by ``Div``). It runs only when the caller's ``enough`` test fails on the result of 2, and its
   shapes fill in only tensors that 2 left less known (no rank, or fewer static dims).

Everything runs on a *weight-free copy* (``weight_free_copy``): large float initializers become typed graph
inputs without values, so models of several GB and models with external data cost their graph only.
Symbolic inference is driven step by step in-process, so it writes nothing to disk (its public entry point
saves ``sym_shape_infer_temp.onnx`` and a ``<uuid>.data`` file in the working directory when inference is
incomplete); where its internals differ from what is expected, the public entry point is run with a private
temporary directory as the working directory.

Dims: a positive int is static; ``-1`` or ``0`` written as a dim value (Paddle writes the batch as ``-1``),
a symbolic name and a missing value are all dynamic (``ir.tensor_spec`` reads them as str or None).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Callable

import onnx

from ..errors import InputError
from .quant import infer_gather_block_quantized
from .weights import is_external, is_weight

__all__ = ["InferredShapes", "ShapeMap", "infer_shapes", "weight_free_copy", "ranks_known", "all_graphs"]

log = logging.getLogger("onnx_consensus")

#: tensor name -> shape (one entry per dim: int static, str symbolic, None unknown); None: rank unknown.
ShapeMap = dict[str, "tuple[int | str | None, ...] | None"]


@dataclass
class InferredShapes:
    """The outcome of ``infer_shapes``.

    Attributes:
        model: the weight-free copy, its value_info (main graph and subgraphs) holding the merged shapes.
        shapes: every tensor the model, ONNX or symbolic inference annotated, in the main graph and all
            control-flow subgraphs (names are assumed unique across scopes, as exporters write them).
        steps: the steps that ran, in order: "declared", "onnx", "symbolic".
    """

    model: onnx.ModelProto
    shapes: ShapeMap = field(default_factory=dict)
    steps: tuple[str, ...] = ()


def all_graphs(graph: onnx.GraphProto):
    """``graph`` and every control-flow subgraph nested in it (If branches, Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from all_graphs(g)


def _dims(vi: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    from .ir import tensor_spec

    return tensor_spec(vi).shape


def _shape_map(model: onnx.ModelProto) -> ShapeMap:
    """Tensor name -> shape for every value info of every graph, and initializer dims."""
    shapes: ShapeMap = {}
    for g in all_graphs(model.graph):
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            if not vi.type.HasField("tensor_type"):
                continue
            shape = _dims(vi)
            if shape is not None or vi.name not in shapes:
                shapes[vi.name] = shape
        for init in g.initializer:
            shapes[init.name] = tuple(int(d) for d in init.dims)
    return shapes


def _knowledge(shape) -> tuple[int, int]:
    """Order of preference between two shapes of one tensor: rank known first, then static dims."""
    if shape is None:
        return (0, 0)
    return (1, sum(isinstance(d, int) for d in shape))


def ranks_known(model: onnx.ModelProto, shapes: ShapeMap) -> bool:
    """Every output of a main-graph node has a known rank (what block detection needs)."""
    return all(shapes.get(o) is not None for n in model.graph.node for o in n.output if o)


def _is_dynamic(dim: onnx.TensorShapeProto.Dimension) -> bool:
    return not (dim.HasField("dim_value") and dim.dim_value > 0)


def _set_shape(inp: onnx.ValueInfoProto, shape: tuple[int, ...]) -> None:
    """Give graph input ``inp`` the full static ``shape`` (InputError when its rank or a static dim disagrees)."""
    tt = inp.type.tensor_type
    if tt.HasField("shape") and len(tt.shape.dim) != len(shape):
        raise InputError(
            f"input shape for {inp.name!r} has rank {len(shape)} but the model input has rank "
            f"{len(tt.shape.dim)}"
        )
    if not tt.HasField("shape"):
        tt.shape.SetInParent()
        for _ in shape:
            tt.shape.dim.add()
    for i, (dim, want) in enumerate(zip(tt.shape.dim, shape)):
        if not _is_dynamic(dim) and dim.dim_value != want:
            raise InputError(
                f"input shape for {inp.name!r} sets dim {i} to {want} but the model fixes it to "
                f"{dim.dim_value}"
            )
        dim.Clear()
        dim.dim_value = want


def _clear_dynamic(inp: onnx.ValueInfoProto, batch_size: int | None) -> None:
    """A dynamic leading dim of graph input ``inp`` becomes ``batch_size`` (when given); -1 / 0 dims become
    unknown, like a symbolic dim."""
    tt = inp.type.tensor_type
    if not tt.HasField("shape"):
        return
    for i, dim in enumerate(tt.shape.dim):
        if i == 0 and batch_size is not None and _is_dynamic(dim):
            dim.Clear()
            dim.dim_value = int(batch_size)
        elif dim.HasField("dim_value") and dim.dim_value <= 0:
            dim.Clear()  # -1 (Paddle's batch) or 0: dynamic, like a symbolic dim


def _weights_as_inputs(src: onnx.GraphProto, g: onnx.GraphProto) -> None:
    """Into ``g``: ``src``'s weights (and small external tensors, not loaded) as graph inputs with their type
    and shape only; its other initializers as they are."""
    declared = {i.name for i in g.input}
    for init in src.initializer:
        if is_weight(init) or is_external(init):  # an external tensor not loaded: its type only
            if init.name not in declared:  # IR < 4 models list initializers as inputs already
                g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            g.initializer.append(init)


def weight_free_copy(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None,
                     batch_size: int | None = None) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference: its weights (``weights.is_weight``) become graph inputs with
    their type and shape only (no values; symbolic inference reads initializer values, so external-data stubs
    would not do); other initializers are kept.

    input_shapes: full static shapes of graph inputs (dynamic dims, ``-1`` included, take the given value; a
    static dim must agree). batch_size: value of a dynamic leading dim of every other graph input; None
    leaves it dynamic. ``-1`` dims left dynamic are cleared (unknown), so inference never sees a negative
    size. value_info is left out (shapes recorded for another batch size would conflict)."""
    input_shapes = dict(input_shapes or {})
    src = model.graph
    init_names = {i.name for i in src.initializer}
    g = onnx.GraphProto()
    g.name = src.name
    g.node.extend(src.node)  # Constant values are copied; they are small in practice
    g.output.extend(src.output)
    g.sparse_initializer.extend(src.sparse_initializer)
    for out in g.output:
        if out.type.HasField("tensor_type"):
            for dim in out.type.tensor_type.shape.dim:
                if dim.HasField("dim_value") and dim.dim_value <= 0:
                    dim.Clear()

    known_inputs = {i.name for i in src.input if i.name not in init_names}
    unknown = set(input_shapes) - known_inputs
    if unknown:
        raise InputError(
            f"input shape given for {sorted(unknown)!r}, which is not a model input "
            f"(inputs: {sorted(known_inputs)!r})"
        )
    for inp in src.input:
        new = g.input.add()
        new.CopyFrom(inp)
        if inp.name in init_names or not new.type.HasField("tensor_type"):
            continue
        if inp.name in input_shapes:
            _set_shape(new, tuple(int(d) for d in input_shapes[inp.name]))
        else:
            _clear_dynamic(new, batch_size)
    _weights_as_inputs(src, g)

    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    m.graph.CopyFrom(g)
    return m


def _onnx_inference(model: onnx.ModelProto) -> onnx.ModelProto | None:
    for kw in ({"data_prop": True}, {}):
        try:
            return onnx.shape_inference.infer_shapes(model, strict_mode=False, **kw)
        except Exception as exc:  # best effort: the next attempt, then the declared shapes
            log.debug("ONNX shape inference (%s) failed: %s", kw or "no data propagation", exc)
    return None


_SYMBOLIC = None
_CWD_LOCK = threading.Lock()


def _symbolic_class():
    """onnxruntime's SymbolicShapeInference. The module is loaded from its file when it can be, so that
    ``onnxruntime.tools``'s package __init__, which imports torch (seconds), is not run for it."""
    global _SYMBOLIC
    if _SYMBOLIC is None:
        mod = sys.modules.get("onnxruntime.tools.symbolic_shape_infer")
        if mod is None:
            spec = importlib.util.find_spec("onnxruntime")
            path = None
            if spec is not None and spec.submodule_search_locations:
                path = os.path.join(list(spec.submodule_search_locations)[0], "tools", "symbolic_shape_infer.py")
            if path and os.path.isfile(path):
                name = "_onnx_consensus_symbolic_shape_infer"
                sspec = importlib.util.spec_from_file_location(name, path)
                mod = importlib.util.module_from_spec(sspec)
                try:
                    sspec.loader.exec_module(mod)
                except ImportError:  # it grew a dependency on the package: import it the usual way
                    mod = None
            if mod is None:
                from onnxruntime.tools import symbolic_shape_infer as mod  # noqa: PLC0415
        _SYMBOLIC = mod.SymbolicShapeInference
    return _SYMBOLIC


def _normalised_axes(model: onnx.ModelProto, shapes: ShapeMap) -> onnx.ModelProto:
    """A copy of ``model`` whose Concat nodes of the main graph carry non-negative axes where the rank of an
    input is known (``axis=-1`` on 1-D shape data, as Paddle writes it, stops symbolic inference; the
    meaning is unchanged)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
            continue
        rank = next((len(shapes[i]) for i in node.input if shapes.get(i) is not None), None)
        for a in node.attribute:
            if a.name == "axis" and a.i < 0 and rank:
                a.i += rank
    return out


def _symbolic_inference(model: onnx.ModelProto, shapes: ShapeMap) -> onnx.ModelProto | None:
    """onnxruntime's symbolic shape inference of ``model`` (auto-merging conflicting symbols; shapes: what is
    known so far, used to normalise axes); its partial result when it cannot infer everything or stops on a
    node it cannot handle; None when it is unavailable. Writes no file."""
    try:
        cls = _symbolic_class()
    except Exception as exc:  # onnxruntime or sympy missing
        log.debug("symbolic shape inference unavailable: %s", exc)
        return None
    model = _normalised_axes(model, shapes)
    sym = None
    try:
        sym = cls(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess_output_rank, verbose
        sym.dispatcher_["GatherBlockQuantized"] = functools.partial(infer_gather_block_quantized, sym)
        # Private methods of SymbolicShapeInference, on purpose: its public entry point (``infer_shapes``)
        # builds its own instance by class name (no GatherBlockQuantized rule can be added), writes
        # ``sym_shape_infer_temp.onnx`` into the working directory and raises without the partial result when
        # inference is incomplete. These three calls are that entry point's body; if they change, the
        # AttributeError below falls back to it.
        step = sym._infer_impl
        sym._preprocess(model)
        while sym.run_:
            step()
        sym._update_output_from_vi()
        return sym.out_mp_
    except AttributeError:  # its internals changed: the public entry point, in a private directory
        pass
    except Exception as exc:  # an op it cannot handle: keep what it found before that node
        log.debug("symbolic shape inference stopped: %s", exc)
        known = getattr(sym, "known_vi_", None)
        if not isinstance(known, dict):
            return None
        partial = onnx.ModelProto()
        partial.graph.value_info.extend(v for v in known.values() if isinstance(v, onnx.ValueInfoProto))
        return partial
    with _CWD_LOCK, tempfile.TemporaryDirectory(prefix="onnx-cprune-shapes-") as tmp:
        cwd = os.getcwd()
        try:
            os.chdir(tmp)
            return cls.infer_shapes(model, auto_merge=True)
        except Exception as exc:
            log.debug("symbolic shape inference failed: %s", exc)
            return None
        finally:
            with contextlib.suppress(OSError):
                os.chdir(cwd)


def _merge_into(model: onnx.ModelProto, shapes: ShapeMap, better: onnx.ModelProto) -> int:
    """Copy into ``model``'s main-graph value_info the value infos of ``better`` that are more known than
    ``shapes`` has them; update ``shapes``. Returns how many tensors improved."""
    improved = 0
    have = {vi.name: vi for vi in model.graph.value_info}
    outputs = {o.name for o in model.graph.output}
    for g in all_graphs(better.graph):
        for vi in list(g.value_info) + list(g.output):
            if not vi.type.HasField("tensor_type"):
                continue
            new = _dims(vi)
            if _knowledge(new) <= _knowledge(shapes.get(vi.name)):
                continue
            shapes[vi.name] = new
            improved += 1
            if g is better.graph and vi.name not in outputs:
                if vi.name in have:
                    have[vi.name].CopyFrom(vi)
                else:
                    model.graph.value_info.append(vi)
    return improved


def infer_shapes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None,
                 batch_size: int | None = None, *,
                 enough: Callable[[onnx.ModelProto, ShapeMap], bool] | None = None) -> InferredShapes:
    """Shapes of every tensor of ``model`` (not modified), in the order of the module docstring.

    input_shapes, batch_size: as ``weight_free_copy`` (fix dynamic input dims before inference).
    enough(model, shapes) -> bool: whether the shapes so far suffice; symbolic inference runs only when it
    returns False after ONNX's inference. Default ``ranks_known``.
    """
    enough = enough or ranks_known
    copy = weight_free_copy(model, input_shapes, batch_size)
    shapes = {vi.name: _dims(vi) for vi in model.graph.value_info if vi.type.HasField("tensor_type")}
    shapes.update(_shape_map(copy))
    steps = ["declared"]
    inferred = _onnx_inference(copy)
    if inferred is not None:
        copy = inferred
        # ONNX's result overrides shapes the input declared (for another batch size, say) when it is as known
        for name, shape in _shape_map(copy).items():
            if _knowledge(shape) >= _knowledge(shapes.get(name)):
                shapes[name] = shape
        steps.append("onnx")
    if not enough(model, shapes):
        sym = _symbolic_inference(copy, shapes)
        if sym is not None:
            n = _merge_into(copy, shapes, sym)
            steps.append("symbolic")
            log.debug("symbolic shape inference resolved %d more tensor shape(s)", n)
    return InferredShapes(model=copy, shapes=shapes, steps=tuple(steps))
