"""OnnxModule: an ONNX graph evaluated node by node with torch ops, and write_back of its weights.

Learned weights (trainable ``nn.Parameter``): floating-point initializers or Constant-node values with
more than one element and only finite values, except BatchNormalization running statistics and inputs a
converter declares as configuration (e.g. Resize scales). Everything else constant (running statistics,
scalars, masks holding -inf/NaN, integer and shape tensors) is a buffer. Parameters and buffers are keyed
by sanitised ONNX names; ``onnx_to_key`` maps back.

Everything that does not depend on the input is precomputed at construction: the node schedule for each
requested output set, parsed attributes, constant tensors, and, per step, the tensors that can be freed
after their last use.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from ..errors import FinetuneError
from ..graph.weights import external_array, is_external
from .ops import NodeCtx, check_supported, lookup, normalize_domain, opset_versions
from .ops_tensor import constant_value


def _sanitize(name: str, taken: set[str]) -> str:
    key = re.sub(r"[^0-9A-Za-z_]", "_", name) or "t"
    if key[0].isdigit():
        key = "t" + key
    base, i = key, 1
    while key in taken:
        key = f"{base}_{i}"
        i += 1
    taken.add(key)
    return key


def is_learned(arr: np.ndarray) -> bool:
    """The weight rule on a value alone: float, more than one element, all finite."""
    return arr.dtype.kind == "f" and arr.size > 1 and bool(np.isfinite(arr).all())


def _initializer_values(inits: dict[str, onnx.TensorProto]) -> dict[str, np.ndarray]:
    """The initializers' values by name (external data read from its mapped file); FinetuneError when an
    external file cannot be read."""
    const_values: dict[str, np.ndarray] = {}
    for name, t in inits.items():
        if is_external(t):
            try:  # an absolute location (graph.ir.load_model_and_layout): read from the mapped file
                const_values[name] = np.array(external_array(t))
            except (KeyError, ValueError, OSError) as exc:
                raise FinetuneError(f"initializer {name!r} keeps its data in an external file that cannot "
                                    f"be read ({exc}): load the model with its external data") from None
            continue
        const_values[name] = numpy_helper.to_array(t)
    return const_values


def _scan_nodes(nodes, versions: dict[str, int], const_values: dict[str, np.ndarray]):
    """(each node's (registry entry, opset version), names read as static inputs, names read as dynamic
    inputs, uses per name); Constant nodes' values are added to ``const_values``."""
    entries = []
    static_names: set[str] = set()
    dynamic_names: set[str] = set()
    uses: dict[str, int] = {}
    for node in nodes:
        dom = normalize_domain(node.domain)
        ver = versions.get(dom, 1)
        entry = lookup(node.op_type, dom, ver)
        entries.append((entry, ver))
        if node.op_type == "Constant" and dom == "":
            const_values[node.output[0]] = constant_value(NodeCtx(node, ver, []).attrs)
        for slot, name in enumerate(node.input):
            if name:
                (static_names if slot in entry.static_inputs else dynamic_names).add(name)
                uses[name] = uses.get(name, 0) + 1
    return entries, static_names, dynamic_names, uses


class OnnxModule(nn.Module):
    """An ``nn.Module`` running one ONNX graph.

    forward(*inputs) takes the graph inputs (initializer-backed inputs excluded) in graph order and
    returns the single output tensor, or a tuple for several outputs. forward_named() takes inputs by
    name and can return any intermediate tensor. Dtypes follow the graph (float32 models: float32).
    """

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        check_supported(model)
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        self.input_names: list[str] = [i.name for i in graph.input if i.name not in inits]
        self.output_names: list[str] = [o.name for o in graph.output]
        # True: BatchNormalization uses its stored statistics in train mode too (fine-tuning on little data)
        self.bn_stats_frozen = False
        const_values = _initializer_values(inits)
        nodes = list(graph.node)
        entries, static_names, dynamic_names, uses = _scan_nodes(nodes, opset_versions(model), const_values)
        learned = {n for n, a in const_values.items()
                   if is_learned(a) and not (n in static_names and n not in dynamic_names)}
        bn_inputs = self._bn_buffers(nodes, const_values, learned, uses)
        self._register_tensors(const_values, learned)
        self._build_steps(nodes, entries, bn_inputs, const_values, learned)

    def _bn_buffers(self, nodes, const_values: dict[str, np.ndarray], learned: set[str],
                    uses: dict[str, int]) -> dict[int, list[str]]:
        """BatchNormalization running statistics are updated in place in train mode. A statistic that is its
        own constant, used only there, is a mutable buffer written back to that constant; one that is shared
        (exporters deduplicate equal tensors, e.g. an untrained BN's running_var == weight, sometimes through
        Identity nodes) gets a private copy ("alias", added to ``const_values``), see write_back. Returns the
        BN nodes' inputs (by node index) with aliases substituted."""
        identity_src = {n.output[0]: n.input[0] for n in nodes
                        if n.op_type == "Identity" and normalize_domain(n.domain) == "" and n.input}
        bn_inputs: dict[int, list[str]] = {}
        self.mutable_buffers: list[str] = []
        self._aliases: dict[str, tuple[int, int, np.ndarray]] = {}
        for idx, node in enumerate(nodes):
            if node.op_type != "BatchNormalization" or normalize_domain(node.domain) != "":
                continue
            ins = list(node.input)
            for slot in (3, 4):
                name = ins[slot] if slot < len(ins) else ""
                if not name:
                    continue
                if name in const_values and name not in learned and uses.get(name) == 1:
                    self.mutable_buffers.append(name)
                    continue
                src, hops = name, 0
                while src not in const_values and src in identity_src and hops < 64:
                    src, hops = identity_src[src], hops + 1
                if src in const_values:
                    alias = f"{name}::bn{idx}.{slot}"
                    self._aliases[alias] = (idx, slot, np.array(const_values[src], copy=True))
                    ins[slot] = alias
            bn_inputs[idx] = ins
        for alias, (_, _, arr) in self._aliases.items():
            const_values[alias] = arr
        return bn_inputs

    def _register_tensors(self, const_values: dict[str, np.ndarray], learned: set[str]) -> None:
        """Learned tensors become Parameters (``weights``), the other constants buffers (``consts``)."""
        self.weights = nn.ParameterDict()
        self.consts = nn.Module()
        taken: set[str] = set()
        self.onnx_to_key: dict[str, str] = {}
        self._param_items: list[tuple[str, str]] = []
        self._buffer_items: list[tuple[str, str]] = []
        for name, arr in const_values.items():
            key = _sanitize(name, taken)
            self.onnx_to_key[name] = key
            t = torch.from_numpy(np.array(arr, copy=True))
            if name in learned:
                self.weights[key] = nn.Parameter(t)
                self._param_items.append((name, key))
            else:
                self.consts.register_buffer(key, t)
                self._buffer_items.append((name, key))

    def _build_steps(self, nodes, entries, bn_inputs: dict[int, list[str]], const_values: dict[str, np.ndarray],
                     learned: set[str]) -> None:
        """One step per node (Constant nodes folded): (op fn, NodeCtx with the static inputs, inputs, outputs,
        single output?), and the plan of the graph outputs."""
        mutable = set(self.mutable_buffers) | set(self._aliases)
        self._steps: list[tuple[Any, ...]] = []
        self._producers: dict[str, int] = {}
        for i, (node, (entry, ver)) in enumerate(zip(nodes, entries)):
            if node.op_type == "Constant" and normalize_domain(node.domain) == "":
                continue
            ins = tuple(bn_inputs.get(i, node.input))
            static = [None if (n in mutable or n in learned or n not in const_values) else const_values[n]
                      for n in ins]
            ctx = NodeCtx(node, ver, static, self)
            outs = tuple(node.output)
            self._steps.append((entry.fn, ctx, ins, outs, len(outs) == 1))
            for o in outs:
                if o:
                    self._producers[o] = len(self._steps) - 1
        self._plans: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        self._plan(tuple(self.output_names))

    # ---- introspection ---------------------------------------------------------------------------

    @property
    def trainable_names(self) -> list[str]:
        """ONNX names of the trainable tensors, in graph (initializer, then Constant) order."""
        return [n for n, _ in self._param_items]

    def onnx_state(self) -> dict[str, torch.Tensor]:
        """ONNX name -> current value of every tensor write_back stores (parameters, BN statistics;
        private copies of shared BN statistics appear as '<name>::bn<node>.<slot>')."""
        out = {n: self.weights[k] for n, k in self._param_items}
        bufs = self.consts._buffers
        for n in list(self.mutable_buffers) + list(self._aliases):
            out[n] = bufs[self.onnx_to_key[n]]
        return out

    def tensors_read(self, outputs: list[str]) -> set[str]:
        """ONNX names of every tensor the nodes computing ``outputs`` read (graph inputs, weights, constants,
        intermediate tensors)."""
        return {n for step in self._plan(tuple(outputs)) for n in step[2] if n}

    # ---- execution -------------------------------------------------------------------------------

    def _plan(self, outputs: tuple[str, ...]) -> list[tuple[Any, ...]]:
        plan = self._plans.get(outputs)
        if plan is not None:
            return plan
        needed: set[int] = set()
        stack = [o for o in outputs]
        seen: set[str] = set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            idx = self._producers.get(name)
            if idx is None or idx in needed:
                continue
            needed.add(idx)
            stack.extend(n for n in self._steps[idx][2] if n)
        order = sorted(needed)
        keep = set(outputs)
        last_use: dict[str, int] = {}
        for pos, idx in enumerate(order):
            for n in self._steps[idx][2]:
                if n and n in self._producers:
                    last_use[n] = pos
        frees: list[list[str]] = [[] for _ in order]
        for n, pos in last_use.items():
            if n not in keep:
                frees[pos].append(n)
        plan = []
        for pos, idx in enumerate(order):
            fn, ctx, ins, outs, single = self._steps[idx]
            plan.append((fn, ctx, ins, outs, single, tuple(frees[pos])))
        self._plans[outputs] = plan
        return plan

    def _constants(self) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = {}
        params = self.weights._parameters
        for n, k in self._param_items:
            env[n] = params[k]
        bufs = self.consts._buffers
        for n, k in self._buffer_items:
            env[n] = bufs[k]
        return env

    def _run(self, env: dict[str, Any], outputs: tuple[str, ...], check=None) -> dict[str, torch.Tensor]:
        """Run the plan for ``outputs``; ``check(ctx, name, value)`` (optional) sees every node output."""
        for fn, ctx, ins, outs, single, free in self._plan(outputs):
            try:
                res = fn(ctx, *[env[n] if n else None for n in ins])
            except KeyError as e:
                raise FinetuneError(f"node {ctx.name!r} ({ctx.op_type}): input {e.args[0]!r} is not "
                                    "available (missing graph input?)") from None
            if single:
                env[outs[0]] = res[0] if type(res) is tuple else res
            else:
                if not isinstance(res, (tuple, list)):
                    res = (res,)
                for n, r in zip(outs, res):
                    if n:
                        env[n] = r
            if check is not None:
                for n in outs:
                    if n:
                        check(ctx, n, env[n])
            for n in free:
                del env[n]
        return {o: env[o] for o in outputs}

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        env = self._constants()
        env.update(zip(self.input_names, inputs))
        res = self._run(env, tuple(self.output_names))
        if len(self.output_names) == 1:
            return res[self.output_names[0]]
        return tuple(res[o] for o in self.output_names)

    def forward_named(self, inputs: dict[str, Any], outputs: list[str] | None = None) -> dict[str, torch.Tensor]:
        """inputs: graph-input name -> tensor (numpy arrays accepted); outputs: any tensor names of the
        graph (default: the graph outputs). Returns name -> tensor."""
        env = self._constants()
        for k, v in inputs.items():
            env[k] = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
        return self._run(env, tuple(outputs) if outputs else tuple(self.output_names))

    def first_nonfinite(self, inputs: dict[str, Any], outputs: list[str] | None = None) -> str | None:
        """Where a forward pass on ``inputs`` first goes non-finite (NaN or inf), in the graph's order: a weight,
        an input, or a node's float output, as "tensor 'x' (Div node 'n')"; None when all are finite."""
        params = self.weights._parameters
        for n, k in self._param_items:
            if _nonfinite(params[k]):
                return f"weight {n!r} (read by {self._reader(n)})"
        env = self._constants()
        for k, v in inputs.items():
            env[k] = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))
            if _nonfinite(env[k]):
                return f"input {k!r}"

        def check(ctx, name, value):
            if _nonfinite(value):
                raise _Found(f"tensor {name!r} ({ctx.op_type} node {ctx.name!r})")
        try:
            with torch.no_grad():
                self._run(env, tuple(outputs) if outputs else tuple(self.output_names), check)
        except _Found as found:
            return str(found)
        return None

    def first_nonfinite_grad(self) -> str | None:
        """The first weight (graph order) whose gradient holds NaN or inf, with the node that reads it."""
        params = self.weights._parameters
        for n, k in self._param_items:
            g = params[k].grad
            if _nonfinite(g):
                return f"the gradient of weight {n!r} (read by {self._reader(n)})"
        return None

    def _reader(self, name: str) -> str:
        for _, ctx, ins, *_ in self._steps:
            if name in ins:
                return f"{ctx.op_type} node {ctx.name!r}"
        return "no node"

    def extra_repr(self) -> str:
        return (f"nodes={len(self._steps)}, inputs={self.input_names}, outputs={self.output_names}, "
                f"trainable={len(self._param_items)}")


class _Found(Exception):
    """Stops ``OnnxModule.first_nonfinite`` at the first non-finite tensor."""


def _nonfinite(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())


def to_torch(model: onnx.ModelProto) -> OnnxModule:
    """Build the OnnxModule of ``model`` (raises UnsupportedOperatorError listing every unsupported op)."""
    return OnnxModule(model)


# ---- write-back -----------------------------------------------------------------------------------

def _fill_tensor(tp: onnx.TensorProto, arr: np.ndarray) -> None:
    """Store ``arr`` in ``tp`` keeping name, dims, data type and storage form (raw / typed / external)."""
    np_dtype = helper.tensor_dtype_to_np_dtype(tp.data_type)
    arr = np.ascontiguousarray(np.asarray(arr, dtype=np_dtype).reshape(tuple(tp.dims)))
    if tp.HasField("raw_data") or tp.data_location == onnx.TensorProto.EXTERNAL:
        tp.raw_data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        if tp.data_location == onnx.TensorProto.EXTERNAL:  # now inline; the writer decides where it goes
            del tp.external_data[:]
            tp.data_location = onnx.TensorProto.DEFAULT
    elif len(tp.float_data) and np_dtype == np.float32:
        del tp.float_data[:]
        tp.float_data.extend(arr.ravel().tolist())
    elif len(tp.double_data):
        del tp.double_data[:]
        tp.double_data.extend(arr.ravel().tolist())
    elif len(tp.int32_data) and np_dtype == np.float16:
        del tp.int32_data[:]
        tp.int32_data.extend(arr.view(np.uint16).ravel().astype(np.int32).tolist())
    else:
        new = numpy_helper.from_array(arr, tp.name)
        for f in ("float_data", "double_data", "int32_data"):
            tp.ClearField(f)
        tp.raw_data = new.raw_data


def write_back(module: OnnxModule, model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers, Constant-node weights and BatchNormalization running
    statistics hold ``module``'s current values. Nothing else changes (nodes, names, opset, metadata,
    value_info, external-data references).

    One exception: a running statistic the graph shares with another tensor (an exporter deduplicated
    equal values, typically in an untrained model: running_var == weight, often via Identity) and that
    training has changed gets its own new initializer ``<name>_bn_stat[_k]``, and only that
    BatchNormalization input is renamed to it.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    state = {n: t.detach().to("cpu").numpy() for n, t in module.onnx_state().items()}
    inits = {t.name: t for t in out.graph.initializer}
    consts = {n.output[0]: n for n in out.graph.node if n.op_type == "Constant" and n.output}
    taken = set(inits) | {o for n in out.graph.node for o in n.output} | {i.name for i in out.graph.input}
    for name, arr in state.items():
        alias = module._aliases.get(name)
        if alias is not None:
            node_idx, slot, orig = alias
            if np.array_equal(arr, orig):
                continue
            base = name.split("::bn")[0] + "_bn_stat"
            new, k = base, 1
            while new in taken:
                new, k = f"{base}_{k}", k + 1
            taken.add(new)
            out.graph.initializer.append(numpy_helper.from_array(arr.astype(orig.dtype), new))
            out.graph.node[node_idx].input[slot] = new
            continue
        if name in inits:
            _fill_tensor(inits[name], arr)
            continue
        node = consts.get(name)
        if node is None:
            raise FinetuneError(f"write_back: tensor {name!r} is neither an initializer nor a Constant "
                                "output of this model")
        for a in node.attribute:
            if a.name == "value":
                _fill_tensor(a.t, arr)
            elif a.name == "value_floats":
                del a.floats[:]
                a.floats.extend(np.asarray(arr, dtype=np.float32).ravel().tolist())
    return out

