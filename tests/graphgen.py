"""A hypothesis strategy for random residual networks, built directly as ONNX ModelProtos (onnx.helper),
together with the ground truth of what was built (no test functions here).

``residual_nets()`` draws one :class:`GenGraph`: a conv (NCHW) or tabular (MatMul/Gemm) network of 1-6
residual blocks with a dynamic batch dim, opset 11-21, random names. Blocks are identity-skip blocks or
projection blocks (1x1 conv / pooling / MatMul on the skip path, sometimes with a stride or width change),
merged by ``Add`` or two-input ``Sum``, with no activation or a ReLU after the merge. Branches may read side
inputs (a second graph input, or an earlier data tensor of the same shape); graph outputs may be taken from
inside the network (a block's exit or pre-activation merge, a branch tensor, a tensor before the blocks).

Ground truth (:class:`GenBlock`) is derived from what the generator *built* — the skip operand is the
entry tensor itself, and no branch tensor is read by anything outside branch + merge nor is a graph
output — not from the detector's code.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

BATCH = "N"  # placeholder for the batch dim in the generator's shapes; the graph uses GenGraph.batch
BATCH_NAMES = ("N", "batch", "batch_size", "s0", "unk__7", "dim_0", "B", "sequence_batch")


@dataclass
class GenBlock:
    """One residual merge the generator built."""

    index: int
    kind: str                       # "identity", "projection" or "broadcast" (identity skip, shape change)
    merge_op: str                   # "Add" or "Sum"
    entry: str                      # the skip operand's source (identity) / the block's input (projection)
    merge: str                      # merge output name (= the detector's merge key)
    post: str | None                # ReLU output after the merge, if any
    branch_nodes: list[str]         # keys (first output names) of the branch nodes, topological order
    branch_tensors: list[str]       # every tensor the branch nodes produce
    side_inputs: list[str]          # data tensors the branch reads besides the entry
    zero_params: list[str]          # initializers to zero for an exactly-zero branch output
    entry_nonneg: bool              # the entry is >= 0 when graph input X is fed >= 0 data
    shape: tuple                    # exit shape (symbolic batch)
    skip_desc: str = "identity"
    node_macs: dict = field(default_factory=dict)  # node key -> MACs per sample, branch + merge + post
    # filled by finalize():
    removable: bool = False
    reason: str = ""
    exit: str = ""
    nodes: list[str] = field(default_factory=list)
    macs: int = 0
    stage: int = -1


@dataclass(repr=False)
class GenGraph:
    model: onnx.ModelProto
    family: str                     # "conv" or "tabular"
    opset: int
    x_name: str                     # the data input
    inputs: dict                    # name -> (static shape with None for batch, kind "x"|"side")
    blocks: list[GenBlock]
    features: dict                  # name -> bool (side_inputs, inner_outputs, projection, sum_merge, ...)
    batch: str = BATCH              # the symbolic batch dim's name in the graph

    @property
    def removable(self) -> list[GenBlock]:
        return [b for b in self.blocks if b.removable]

    def feeds(self, batch: int, rng: np.random.Generator, *, nonneg: bool = True) -> dict:
        out = {}
        for name, (shape, kind) in self.inputs.items():
            dims = [batch if d is None else d for d in shape]
            if kind == "x" and nonneg:
                out[name] = rng.uniform(0.0, 1.0, size=dims).astype(np.float32)
            else:
                out[name] = rng.uniform(-1.0, 1.0, size=dims).astype(np.float32)
        return out

    def __repr__(self) -> str:
        return "GenGraph(" + self.describe() + ")"

    def describe(self) -> str:
        on = sorted(k for k, v in self.features.items() if v)
        lines = [f"{self.family} opset {self.opset}, batch {self.batch!r}, {len(self.model.graph.node)} nodes, {on}"]
        for b in self.blocks:
            lines.append(f"  block {b.index} {b.kind}/{b.skip_desc} {b.merge_op} post={b.post is not None} "
                         f"entry={b.entry!r} merge={b.merge!r} exit={b.exit!r} removable={b.removable} "
                         f"{b.reason} side={b.side_inputs}")
        return "\n".join(lines)


_NAME_CHARS = string.ascii_letters + string.digits + "_./:-"


class _Builder:
    """Accumulates nodes/initializers with random unique names; tracks shapes and consumers."""

    def __init__(self, rng: np.random.Generator, draw, opset: int):
        self.rng = rng
        self.draw = draw
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.init_names: set[str] = set()
        self.used: set[str] = set()
        self.shape: dict[str, tuple] = {}
        self.node_names: list[str] = []
        self.init_shape: dict[str, tuple] = {}
        self.macs: dict[str, int] = {}  # node key -> multiply-accumulates per sample (Conv/Gemm/MatMul)

    # -- names --
    def name(self, hint: str = "") -> str:
        r = self.rng
        while True:
            style = r.integers(0, 6)
            if style == 0:
                n = f"onnx::{hint or 'T'}_{r.integers(0, 10**4)}"
            elif style == 1:
                n = "/" + "/".join(f"{hint or 'm'}{r.integers(0, 50)}" for _ in range(r.integers(1, 4))) + "/out"
            elif style == 2:
                n = str(r.integers(0, 10**6))  # purely numeric, like torch's old exporter
            elif style == 3:
                n = "".join(r.choice(list(_NAME_CHARS), size=r.integers(1, 12)))
            elif style == 4:
                n = f"{hint}é{r.integers(0, 999)}"  # non-ASCII
            else:
                n = f"t{r.integers(0, 10**9):x}"
            if n and n not in self.used:
                self.used.add(n)
                return n

    def node_name(self) -> str:
        r = self.rng
        k = r.integers(0, 10)
        if k < 4:
            return ""  # empty node names (onnxruntime rejects duplicated non-empty ones)
        while True:
            n = f"node_{r.integers(0, 10**6)}" if k < 7 else self.name("n")
            if n not in self.node_names:
                self.node_names.append(n)
                return n

    # -- graph pieces --
    def init(self, array: np.ndarray, hint: str = "w") -> str:
        n = self.name(hint)
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), n))
        self.init_names.add(n)
        self.init_shape[n] = array.shape
        return n

    def weight(self, shape: tuple, fan_in: int, hint: str = "w") -> str:
        return self.init(self.rng.normal(0.0, 0.5 / np.sqrt(max(fan_in, 1)), size=shape), hint)

    def node(self, op: str, inputs: list[str], shape: tuple, **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.node_name(), **attrs))
        self.shape[out] = shape
        if op == "Conv":
            c_out, c_in, kh, kw = self.init_shape[inputs[1]]
            self.macs[out] = int(np.prod(shape[1:])) * c_in * kh * kw
        elif op in ("Gemm", "MatMul"):
            self.macs[out] = int(np.prod(self.init_shape[inputs[1]]))
        else:
            self.macs[out] = 0
        return out


def _conv_out(h: int, k: int, s: int, p: int) -> int:
    return (h + 2 * p - k) // s + 1


@st.composite
def residual_nets(draw, max_blocks: int = 6, *, loose_outputs: bool = False) -> GenGraph:
    """loose_outputs: also declare some graph outputs with unknown dims (all, or just the batch dim) or with a
    batch dim named differently from the input's (off by default; test_loose_output_shapes turns it on)."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    opset = draw(st.integers(11, 21))
    family = draw(st.sampled_from(["conv", "conv", "tabular"]))
    n_blocks = draw(st.integers(1, max_blocks))
    p = lambda pct: draw(st.integers(0, 99)) < pct  # noqa: E731  a draw with probability pct %
    b = _Builder(rng, draw, opset)

    conv = family == "conv"
    inputs: dict = {}
    input_vis: list[onnx.ValueInfoProto] = []
    extra_outputs: list[str] = []
    features = dict(side_inputs=False, inner_outputs=False, projection=False, sum_merge=False,
                    branch_output=False, read_outside=False, earlier_side=False, shape_change=False,
                    exit_output=False, pre_block_output=False, post_relu=False, stem=False,
                    value_info=False, loose_output=False, post_other=False)
    batch_name = draw(st.sampled_from(BATCH_NAMES))

    def vi(name: str, shape) -> onnx.ValueInfoProto:
        dims = None if shape is None else [batch_name if d == BATCH else d for d in shape]
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    def full(c: int, h: int | None = None, w: int | None = None) -> tuple:
        return (BATCH, c, h, w) if conv else (BATCH, c)

    # ---- input and stem ----
    width = draw(st.integers(1, 4)) if conv else draw(st.integers(1, 6))
    H = draw(st.sampled_from([4, 5, 6, 8])) if conv else None
    W = draw(st.sampled_from([4, 6, 7, 8])) if conv else None
    x = b.name("input")
    shape = full(width, H, W)
    b.shape[x] = shape
    inputs[x] = ((None,) + shape[1:], "x")
    input_vis.append(vi(x, shape))
    nonneg = {x}  # tensors >= 0 whenever X >= 0
    data_tensors = [x]  # data tensors in order of creation (for "earlier tensor" side reads)
    cur = x
    if p(65):
        features["stem"] = True
        new_w = draw(st.integers(1, 6))
        if conv:
            k = draw(st.sampled_from([1, 3]))
            wt = b.weight((new_w, width, k, k), width * k * k)
            ins = [cur, wt] + ([b.init(rng.normal(0, 0.1, new_w), "b")] if p(50) else [])
            cur = b.node("Conv", ins, full(new_w, H, W), kernel_shape=[k, k], pads=[k // 2] * 4)
        else:
            if p(50):
                wt = b.weight((width, new_w), width)
                cur = b.node("Gemm", [cur, wt, b.init(rng.normal(0, 0.1, new_w), "b")], full(new_w))
            else:
                cur = b.node("MatMul", [cur, b.weight((width, new_w), width)], full(new_w))
        width = new_w
        data_tensors.append(cur)
        if p(70):
            cur = b.node("Relu", [cur], b.shape[cur])
            nonneg.add(cur)
            data_tensors.append(cur)
        if p(15):
            extra_outputs.append(cur)  # a tensor before the blocks is a graph output (and the entry)
            features["pre_block_output"] = True

    side_pool: dict[tuple, list[str]] = {}  # side graph inputs by shape, for reuse

    def side_operand(t_shape: tuple, entry: str) -> str:
        """A tensor to multiply a branch tensor of shape t_shape by: a (new or reused) side graph input, or
        an earlier data tensor of exactly that shape (produced before the entry)."""
        earlier = [t for t in data_tensors if b.shape[t] == t_shape and t != entry
                   and data_tensors.index(t) < data_tensors.index(entry)] if entry in data_tensors else []
        if earlier and p(30):
            features["earlier_side"] = True
            return str(rng.choice(earlier))
        c = t_shape[1]
        s_shape = ((c, 1, 1) if p(50) else (1, c, 1, 1)) if conv else ((c,) if p(50) else (1, c))
        if side_pool.get(s_shape) and p(40):
            return str(rng.choice(side_pool[s_shape]))
        s = b.name("side")
        inputs[s] = (s_shape, "side")
        input_vis.append(vi(s, s_shape))
        side_pool.setdefault(s_shape, []).append(s)
        return s

    blocks: list[GenBlock] = []
    pending_branch_reads: list[tuple[str, int]] = []  # (branch tensor, block index) to read later

    for i in range(n_blocks):
        entry = cur
        entry_nonneg = entry in nonneg
        projection = p(25)
        new_w, stride, skip_desc = width, 1, "identity"
        broadcast = False
        if projection:
            features["projection"] = True
            if width == 1 and p(40):
                # identity skip, but the merge broadcasts a width-1 entry to the branch's width: a shape change
                broadcast, new_w, skip_desc = True, draw(st.integers(2, 6)), "broadcast"
            else:
                if p(50):
                    new_w = draw(st.integers(1, 6))
                if conv and H % 2 == 0 and W % 2 == 0 and H >= 2 and W >= 2 and p(50):
                    stride = 2
        oh = _conv_out(H, 1, stride, 0) if conv else None
        ow = _conv_out(W, 1, stride, 0) if conv else None
        out_shape = full(new_w, oh, ow)
        if out_shape != b.shape[entry]:
            features["shape_change"] = True

        # ---- branch ----
        n_layers = draw(st.integers(1, 3))
        branch_nodes: list[str] = []
        zero_params: list[str] = []
        t, tw = entry, width
        for layer in range(n_layers):
            last = layer == n_layers - 1
            lw = new_w if last else draw(st.integers(1, 6))
            s = stride if layer == 0 else 1
            if conv:
                k = draw(st.sampled_from([1, 3]))
                wt = b.weight((lw, tw, k, k), tw * k * k)
                bias = b.init(rng.normal(0, 0.1, lw), "b") if p(50) else None
                h2, w2 = _conv_out(b.shape[t][2], k, s, k // 2), _conv_out(b.shape[t][3], k, s, k // 2)
                t = b.node("Conv", [t, wt] + ([bias] if bias else []), full(lw, h2, w2),
                           kernel_shape=[k, k], pads=[k // 2] * 4, strides=[s, s])
                zero_params = [wt] + ([bias] if bias else [])
            else:
                style = draw(st.integers(0, 2))
                wt = b.weight((tw, lw), tw)
                if style == 0:
                    t = b.node("MatMul", [t, wt], full(lw))
                    zero_params = [wt]
                elif style == 1:
                    bias = b.init(rng.normal(0, 0.1, lw), "b")
                    t = b.node("Gemm", [t, wt, bias], full(lw))
                    zero_params = [wt, bias]
                else:  # MatMul + a constant bias Add (an Add that is not a merge)
                    t = b.node("MatMul", [t, wt], full(lw))
                    branch_nodes.append(t)
                    bias = b.init(rng.normal(0, 0.1, lw), "b")
                    t = b.node("Add", [t, bias] if p(50) else [bias, t], full(lw))
                    zero_params = [wt, bias]
            branch_nodes.append(t)
            tw = lw
            if p(25):  # BatchNormalization (opset 9/14/15 signatures agree in inference)
                bn = [b.init(rng.uniform(0.5, 1.5, lw), "g"), b.init(rng.normal(0, 0.1, lw), "beta"),
                      b.init(rng.normal(0, 0.1, lw), "mean"), b.init(rng.uniform(0.5, 1.5, lw), "var")]
                bshape = b.shape[t]
                t = b.node("BatchNormalization", [t] + bn, bshape)
                branch_nodes.append(t)
                zero_params += [bn[1], bn[2]]  # BN(0) = 0 with beta = mean = 0
            if p(30):  # side input: a per-channel / per-feature scale, or an earlier tensor
                features["side_inputs"] = True
                so = side_operand(b.shape[t], entry)
                t = b.node("Mul", [t, so] if p(50) else [so, t], b.shape[t])
                branch_nodes.append(t)
            if not last or p(20):
                t = b.node("Relu", [t], b.shape[t])
                branch_nodes.append(t)
        branch_out = t

        # ---- skip path ----
        skip = entry
        skip_nodes: list[str] = []
        if broadcast:
            pass
        elif projection:
            if conv and new_w == width and p(50):
                op = str(rng.choice(["AveragePool", "MaxPool"]))
                skip = b.node(op, [entry], out_shape, kernel_shape=[stride, stride], strides=[stride, stride])
                skip_desc = op
            elif conv:
                skip = b.node("Conv", [entry, b.weight((new_w, width, 1, 1), width)], out_shape,
                              kernel_shape=[1, 1], strides=[stride, stride])
                skip_desc = "Conv1x1"
            else:
                skip = b.node("MatMul", [entry, b.weight((width, new_w), width)], out_shape)
                skip_desc = "MatMul"
            skip_nodes.append(skip)

        # ---- merge and post ----
        merge_op = "Sum" if p(30) else "Add"
        if merge_op == "Sum":
            features["sum_merge"] = True
        operands = [skip, branch_out] if p(50) else [branch_out, skip]
        merge = b.node(merge_op, operands, out_shape)
        post = None
        cur = merge
        after = draw(st.integers(0, 99))
        if after < 50:
            features["post_relu"] = True
            post = b.node("Relu", [merge], out_shape)
            cur = post
            nonneg.add(post)
        elif after < 62:  # another shape-keeping op after the merge: not part of the block
            features["post_other"] = True
            op = str(rng.choice(["Sigmoid", "Identity", "LeakyRelu", "Tanh"]))
            cur = b.node(op, [merge], out_shape)

        blk = GenBlock(index=i, kind="broadcast" if broadcast else "projection" if projection else "identity", merge_op=merge_op,
                       entry=entry, merge=merge, post=post, branch_nodes=branch_nodes,
                       branch_tensors=list(branch_nodes), side_inputs=[], zero_params=zero_params,
                       entry_nonneg=entry_nonneg, shape=out_shape, skip_desc=skip_desc,
                       node_macs={k: b.macs[k] for k in branch_nodes + [merge] + ([post] if post else [])})
        blocks.append(blk)
        data_tensors.extend(skip_nodes + branch_nodes + [merge] + ([cur] if cur != merge else []))
        width = new_w
        if conv:
            H, W = oh, ow

        # ---- inner graph outputs ----
        r = draw(st.integers(0, 99))
        if r < 12:
            extra_outputs.append(cur)                           # the block's exit
            features["exit_output"] = True
        elif r < 18 and post is not None:
            extra_outputs.append(merge)                         # pre-activation merge: the ReLU leaves the block
            features["exit_output"] = True
        elif r < 26:
            extra_outputs.append(str(rng.choice(branch_nodes)))  # a branch tensor: not removable
            features["branch_output"] = True
        elif r < 31:
            pending_branch_reads.append((str(rng.choice(branch_nodes)), i))  # read by a node outside

    # ---- head ----
    final_outputs: list[str] = []
    head = draw(st.integers(0, 2))  # 0: the last exit; 1: a classifier head; 2: both
    if head != 1:
        final_outputs.append(cur)
    if head >= 1:
        t = cur
        if conv:
            t = b.node("GlobalAveragePool", [t], full(width, 1, 1))
            t = b.node("Flatten", [t], (BATCH, width), axis=1)
        k = draw(st.integers(1, 5))
        if p(50):
            t = b.node("Gemm", [t, b.weight((width, k), width), b.init(rng.normal(0, 0.1, k), "b")], (BATCH, k))
        else:
            t = b.node("MatMul", [t, b.weight((width, k), width)], (BATCH, k))
        final_outputs.append(t)
    for bt, _ in pending_branch_reads:  # a branch tensor read outside its block (by a side head)
        features["read_outside"] = True
        final_outputs.append(b.node("Relu" if p(50) else "Identity", [bt], b.shape[bt]))

    outputs: list[str] = []
    for o in final_outputs + extra_outputs:
        if o not in outputs:
            outputs.append(o)
    if p(30):
        rng.shuffle(outputs)
    features["inner_outputs"] = bool(extra_outputs)

    output_vis = []
    for o in outputs:
        shape = b.shape[o]
        if loose_outputs and p(40):
            features["loose_output"] = True
            style = draw(st.integers(0, 2))
            if style == 0:
                shape = (None,) * len(shape)                    # rank only, every dim unknown
            else:                                               # unknown or differently named batch dim
                shape = (None if style == 1 else "out_" + batch_name,) + tuple(shape[1:])
            output_vis.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, list(shape)))
            continue
        output_vis.append(vi(o, shape))
    value_info = []
    if p(25):  # exporters often record intermediate shapes
        features["value_info"] = True
        inner = [n.output[0] for n in b.nodes if n.output[0] not in outputs]
        value_info = [vi(t, b.shape[t]) for t in inner if p(50)]
    graph = helper.make_graph(b.nodes, b.name("graph"), input_vis, output_vis, initializer=b.inits,
                              value_info=value_info)
    ir_min = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=int(draw(st.integers(ir_min, 10))), producer_name="graphgen")
    gen = GenGraph(model=model, family=family, opset=opset, x_name=x, inputs=inputs, blocks=blocks,
                   features=features, batch=batch_name)
    finalize(gen)
    return gen


def finalize(gen: GenGraph) -> None:
    """Fill each block's ground truth from the built graph: removable, reason, exit, node keys, side inputs."""
    g = gen.model.graph
    inits = {t.name for t in g.initializer}
    outputs = {o.name for o in g.output}
    consumers: dict[str, list[str]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.output[0])
    for blk in gen.blocks:
        if blk.kind != "identity":
            blk.removable, blk.reason = False, f"projection ({blk.skip_desc})"
            continue
        members = set(blk.branch_nodes) | {blk.merge}
        reason = ""
        for t in blk.branch_tensors:
            if t in outputs:
                reason = f"branch tensor {t} is a graph output"
                break
            if any(c not in members for c in consumers.get(t, [])):
                reason = f"branch tensor {t} is read outside the block"
                break
        blk.removable, blk.reason = not reason, reason
        exit_, nodes = blk.merge, list(blk.branch_nodes) + [blk.merge]
        if blk.post is not None and blk.merge not in outputs and consumers.get(blk.merge) == [blk.post]:
            exit_ = blk.post
            nodes.append(blk.post)
        blk.exit, blk.nodes = exit_, nodes
        produced = set(nodes)
        side = []
        by_key = {n.output[0]: n for n in g.node}
        for key in nodes:
            for i in by_key[key].input:
                if i and i not in inits and i != blk.entry and i not in produced and i not in side:
                    side.append(i)
        blk.side_inputs = side
        blk.macs = sum(blk.node_macs[k] for k in nodes)
    stage, prev = -1, None  # runs of consecutive same-shaped removable blocks
    for blk in gen.removable:
        if blk.shape != prev:
            stage, prev = stage + 1, blk.shape
        blk.stage = stage
