"""Block detection on exported CIFAR ResNets (three export forms, random names) and hand-built graphs."""
import numpy as np
import pytest

from onnx_consensus.graph.blocks import find_blocks
from tests.helpers import randomize_names, resnet_onnx, tiny_residual_graph

FORMS = ("folded", "bn", "dynamo")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("depth", [20, 56])
def test_resnet_block_counts_with_random_names(depth, form):
    n = (depth - 2) // 6
    model = randomize_names(resnet_onnx(depth, form), seed=depth)
    report = find_blocks(model)
    assert len(report.blocks) == 3 * n - 2
    projections = [r for r in report.not_removable if "projection" in r.reason]
    assert len(projections) == 2
    # stage structure: n blocks at 16 channels, n-1 at 32, n-1 at 64
    stages = [b.stage for b in report.blocks]
    assert stages == [0] * n + [1] * (n - 1) + [2] * (n - 1)
    assert [b.shape[1] for b in report.blocks] == [16] * n + [32] * (n - 1) + [64] * (n - 1)
    for b in report.blocks:
        assert b.id == b.exit and b.entry != b.exit
        assert b.side_inputs == ()


def test_resnet32_count():
    assert len(find_blocks(resnet_onnx(32, "folded")).blocks) == 13


def test_detection_independent_of_names():
    base = resnet_onnx(20, "bn")
    shapes = [(b.shape[1:], len(b.nodes)) for b in find_blocks(base).blocks]
    for seed in range(3):
        renamed = find_blocks(randomize_names(base, seed=seed)).blocks
        assert [(b.shape[1:], len(b.nodes)) for b in renamed] == shapes


def test_block_macs_resnet56():
    report = find_blocks(resnet_onnx(56, "folded"))
    assert all(b.macs == 4_718_592 for b in report.blocks)


def test_post_merge_relu_belongs_to_block():
    model = resnet_onnx(20, "folded")
    ops = {n.output[0]: n.op_type for n in model.graph.node}
    for b in find_blocks(model).blocks:
        assert ops[b.exit] == "Relu"
        assert ops[b.merge] == "Add"


def test_sum_merge_and_side_input():
    report = find_blocks(tiny_residual_graph(side_input=True, merge="Sum"))
    assert len(report.blocks) == 1
    b = report.blocks[0]
    assert (b.entry, b.exit) == ("h", "r")
    assert b.side_inputs == ("bias",)


def test_branch_read_outside_is_not_removable():
    model = tiny_residual_graph()
    # a second consumer of the branch tensor b0 outside the block: the block has two exits
    from onnx import helper, TensorProto
    model.graph.node.append(helper.make_node("Identity", ["b0"], ["leak"]))
    model.graph.output.append(helper.make_tensor_value_info("leak", TensorProto.FLOAT, ["N", 4]))
    report = find_blocks(model)
    assert report.blocks == []
    assert "outside" in report.not_removable[0].reason or "graph output" in report.not_removable[0].reason


def test_bias_add_is_not_a_merge():
    from onnx import helper, numpy_helper, TensorProto
    import onnx
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.ones((2, 4), np.float32), "c")])
    report = find_blocks(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    assert report.blocks == [] and report.not_removable == []
    del onnx


# ------------------------------------------------------------------ learned-weight branches (tanh-GELU)

def _gelu_tanh(nodes, inits, h: str, p: str) -> str:
    """Decomposed tanh-GELU of tensor h as the classic exporter writes it: 0.5*h*(1+tanh(c*(h+0.044715*h^3)))."""
    from onnx import helper
    from onnx import numpy_helper as nh

    for name, v in (("k3", 0.044715), ("c", np.sqrt(2 / np.pi)), ("one", 1.0), ("half", 0.5)):
        inits.append(nh.from_array(np.array(v, np.float32), f"{p}{name}"))
    nodes += [helper.make_node("Mul", [h, h], [f"{p}sq"]), helper.make_node("Mul", [f"{p}sq", h], [f"{p}cube"]),
              helper.make_node("Mul", [f"{p}k3", f"{p}cube"], [f"{p}kc"]),
              helper.make_node("Add", [h, f"{p}kc"], [f"{p}inner"]),  # h + 0.044715*h^3: a merge, no block
              helper.make_node("Mul", [f"{p}inner", f"{p}c"], [f"{p}arg"]), helper.make_node("Tanh", [f"{p}arg"], [f"{p}t"]),
              helper.make_node("Add", [f"{p}t", f"{p}one"], [f"{p}t1"]), helper.make_node("Mul", [h, f"{p}t1"], [f"{p}ht"]),
              helper.make_node("Mul", [f"{p}ht", f"{p}half"], [f"{p}gelu"])]
    return f"{p}gelu"


def gelu_mlp_model(layers: int = 2, d: int = 8) -> "onnx.ModelProto":
    """x(N,T,d) -> layers of x + W2 GELU_tanh(W1 LN(x) + b1) -> y = x @ head (N,T,3)."""
    import onnx
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for k in range(layers):
        inits += [nh.from_array(np.ones(d, np.float32), f"g{k}"), nh.from_array(np.zeros(d, np.float32), f"be{k}"),
                  nh.from_array((rng.standard_normal((d, 2 * d)) * 0.3).astype(np.float32), f"w1_{k}"),
                  nh.from_array((rng.standard_normal(2 * d) * 0.1).astype(np.float32), f"b1_{k}"),
                  nh.from_array((rng.standard_normal((2 * d, d)) * 0.3).astype(np.float32), f"w2_{k}")]
        nodes += [helper.make_node("LayerNormalization", [x, f"g{k}", f"be{k}"], [f"n{k}"], axis=-1),
                  helper.make_node("MatMul", [f"n{k}", f"w1_{k}"], [f"m{k}"]),
                  helper.make_node("Add", [f"m{k}", f"b1_{k}"], [f"h{k}"])]
        act = _gelu_tanh(nodes, inits, f"h{k}", f"l{k}_")
        nodes += [helper.make_node("MatMul", [act, f"w2_{k}"], [f"o{k}"]), helper.make_node("Add", [x, f"o{k}"], [f"r{k}"])]
        x = f"r{k}"
    inits.append(nh.from_array((rng.standard_normal((d, 3)) * 0.3).astype(np.float32), "head"))
    nodes.append(helper.make_node("MatMul", [x, "head"], ["y"]))
    g = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", 3])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_tanh_gelu_inner_sum_is_not_a_block():
    """Issue 12, failure 6: `h + 0.044715*h^3` inside a tanh-GELU has no weighted op: not a block, not listed;
    the MLP sub-block around it is the candidate, and removing it is exact (y = x @ head)."""
    from onnx_consensus.graph.surgery import remove_blocks
    from tests.helpers import initializer, run

    model = gelu_mlp_model()
    report = find_blocks(model)
    assert [(b.entry, b.exit) for b in report.blocks] == [("x", "r0"), ("r0", "r1")]
    assert all("l0_inner" not in (r.merge, *r.operands) for r in report.not_removable)
    assert not any("nested" in r.reason for r in report.not_removable)
    assert "l0_inner" in report.blocks[0].nodes  # the GELU is part of the MLP branch
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    out = run(remove_blocks(model, report.blocks), {"x": x})[0]
    np.testing.assert_allclose(out, x @ initializer(model, "head"), rtol=1e-5, atol=1e-5)


def test_tanh_gelu_torch_export():
    """The same on torch's classic export of nn.GELU(approximate='tanh') (decomposed at opset 17)."""
    import os

    import onnx
    torch = pytest.importorskip("torch")
    from tests.helpers import CACHE, run

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc1, self.fc2 = torch.nn.LayerNorm(16), torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

        def forward(self, x):
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x)), approximate="tanh"))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(Layer(), Layer())
            self.head = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.layers(x).mean(1))

    torch.manual_seed(0)
    net = Net().eval()
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, "gelu-tanh-mlp-classic-17.onnx")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.onnx.export(net, (torch.randn(2, 5, 16),), tmp, opset_version=17, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "N", 1: "T"}})
        os.replace(tmp, path)
    model = onnx.load(path)
    ops = {n.output[0]: n.op_type for n in model.graph.node}
    assert "Tanh" in ops.values() and "Gelu" not in ops.values()  # decomposed, with its x + c*x^3 merge
    blocks = find_blocks(randomize_names(model, seed=3, keep_io=True)).blocks
    assert len(blocks) == 2 and blocks[0].entry == "x"
    report = find_blocks(model)
    assert not any("nested" in r.reason for r in report.not_removable)
    x = torch.randn(3, 7, 16)
    from onnx_consensus.graph.surgery import remove_blocks

    out = run(remove_blocks(model, report.blocks), {"x": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, net.head(x.mean(1)).numpy(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ decomposed norms: a walk over consumers

def decomposed_postln_model(kind: str, d: int = 8, side_chains: int = 24) -> "onnx.ModelProto":
    """e = LN(x); r = e + e @ W1; y = decomposed LN(r); out = y @ W2 + s, s a side computation from input p.

    kind "far": ``side_chains`` parallel 8-op chains from p sit at the same topological levels as the norm, so
    the norm's nodes lie more than 80 positions apart. kind "long": every norm op is followed by a Cast to
    float (as mixed-precision exports write), 18 nodes before the affine."""
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    inits = [nh.from_array(np.ones(d, np.float32), "g0"), nh.from_array(np.zeros(d, np.float32), "b0"),
             nh.from_array((rng.standard_normal((d, d)) * 0.3).astype(np.float32), "w1"),
             nh.from_array((rng.standard_normal((d, d)) * 0.3).astype(np.float32), "w2"),
             nh.from_array(np.array(2.0, np.float32), "two"), nh.from_array(np.array(1e-5, np.float32), "eps"),
             nh.from_array((rng.random(d) + 0.5).astype(np.float32), "gamma"),
             nh.from_array((rng.standard_normal(d) * 0.1).astype(np.float32), "beta")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g0", "b0"], ["e"], axis=-1),
             helper.make_node("MatMul", ["e", "w1"], ["f"]), helper.make_node("Add", ["e", "f"], ["r"])]
    steps = [("ReduceMean", ["r"], "mean", {"axes": [-1]}), ("Sub", ["r", "mean"], "dev", {}),
             ("Pow", ["dev", "two"], "sq", {}), ("ReduceMean", ["sq"], "var", {"axes": [-1]}),
             ("Add", ["var", "eps"], "ve", {}), ("Sqrt", ["ve"], "sd", {}), ("Div", ["dev", "sd"], "nrm", {})]
    rename: dict[str, str] = {}
    for op, ins, out, attrs in steps:
        ins = [rename.get(i, i) for i in ins]
        nodes.append(helper.make_node(op, ins, [out], **attrs))
        if kind == "long":
            nodes += [helper.make_node("Cast", [out], [out + "_c"], to=TensorProto.FLOAT),
                      helper.make_node("Cast", [out + "_c"], [out + "_cc"], to=TensorProto.FLOAT)]
            rename[out] = out + "_cc"
    nodes += [helper.make_node("Mul", [rename.get("nrm", "nrm"), "gamma"], ["scaled"]),
              helper.make_node("Add", ["scaled", "beta"], ["y"]), helper.make_node("MatMul", ["y", "w2"], ["z"])]
    side = []
    for c in range(side_chains if kind == "far" else 1):
        t = "p"
        for k in range(8):
            side.append(helper.make_node("Neg" if k % 2 else "Abs", [t], [f"s{c}_{k}"]))
            t = f"s{c}_{k}"
    side.append(helper.make_node("Sum", [f"s{c}_7" for c in range(side_chains if kind == "far" else 1)], ["s"]))
    nodes += side + [helper.make_node("Add", ["z", "s"], ["out"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", d]),
              helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", "T", d])]
    g = helper.make_graph(nodes, "dln", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", "T", d])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("kind", ["far", "long"])
def test_decomposed_norm_found_by_consumer_walk(kind):
    """A post-LN sub-block ending in a decomposed LayerNorm belongs to the block whatever separates the norm's
    nodes in topological order ("far": more than 80 positions, the old window) or however many nodes it has
    ("long": more than 16, the old limit); removing it gives out = LN(x) @ W2 + s exactly."""
    from onnx_consensus.graph.ir import GraphIndex, to_gs
    from onnx_consensus.graph.surgery import remove_blocks
    from tests.helpers import initializer, run

    model = decomposed_postln_model(kind)
    index = GraphIndex(to_gs(model))
    pos = {n.outputs[0].name: index.position[id(n)] for n in index.nodes}
    if kind == "far":
        assert pos["nrm"] - pos["r"] > 80
    else:
        assert pos["y"] - pos["r"] > 16
    blocks = find_blocks(model).blocks
    assert [(b.entry, b.exit) for b in blocks] == [("e", "y")]
    assert {"mean", "sd", "nrm", "scaled", "y"} <= set(blocks[0].nodes)
    rng = np.random.default_rng(2)
    x, p = (rng.standard_normal((2, 5, 8)).astype(np.float32) for _ in range(2))
    out = run(remove_blocks(model, blocks), {"x": x, "p": p})[0]
    ln = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    s = sum(-np.abs(p) for _ in range(24 if kind == "far" else 1))  # Abs, Neg, ... 8 times: -|p|
    np.testing.assert_allclose(out, ln @ initializer(model, "w2") + s, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ the post-merge rule registry

def test_registered_post_merge_rule_is_used():
    """A rule registered with one decorated function (here: a Clip after the merge, ReLU6-style) extends
    the block; without it the block ends at the merge."""
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    from onnx_consensus.graph.blocks import POST_MERGE_RULES, post_merge_rule, sole_consumer

    w = nh.from_array(np.eye(4, dtype=np.float32), "w")
    lo, hi = nh.from_array(np.array(0, np.float32), "lo"), nh.from_array(np.array(6, np.float32), "hi")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["b"]),
             helper.make_node("Add", ["h", "b"], ["r"]), helper.make_node("Clip", ["r", "lo", "hi"], ["c"]),
             helper.make_node("MatMul", ["c", "w"], ["y"])]
    g = helper.make_graph(nodes, "clip", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w, lo, hi])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    assert [b.exit for b in find_blocks(model).blocks] == ["r"]

    @post_merge_rule("test_clip")
    def clip(ctx, t):
        return sole_consumer(ctx, t, ("Clip",))

    try:
        with pytest.raises(ValueError, match="already registered"):
            post_merge_rule("test_clip")(clip)
        blocks = find_blocks(model).blocks
        assert [(b.exit, b.nodes) for b in blocks] == [("c", ("b", "r", "c"))]
    finally:
        POST_MERGE_RULES.pop("test_clip")
    assert [b.exit for b in find_blocks(model).blocks] == ["r"]


# ------------------------------------------------------------------ KV cache: structure first, names logged

def _fused_kv_model(past: str, present: str) -> "onnx.ModelProto":
    """x (B,T,8) -> x + MultiHeadAttention(q, k, v, past) @ wo; the attention op also writes the cache output."""
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    inits = [nh.from_array(np.eye(8, dtype=np.float32), n) for n in ("wq", "wo")]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]),
             helper.make_node("MultiHeadAttention", ["q", "q", "q", "", "", "", past + "_k", past + "_v"],
                              ["a", present + "_k", present + "_v"], domain="com.microsoft", num_heads=2),
             helper.make_node("MatMul", ["a", "wo"], ["o"]), helper.make_node("Add", ["x", "o"], ["y"])]
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", 8])] + [
        helper.make_tensor_value_info(past + s, TensorProto.FLOAT, ["B", 2, "P", 4]) for s in ("_k", "_v")]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", 8])] + [
        helper.make_tensor_value_info(present + s, TensorProto.FLOAT, ["B", 2, "Q", 4]) for s in ("_k", "_v")]
    g = helper.make_graph(nodes, "mha", ins, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_kv_cache_through_attention_op_found_without_names(caplog):
    report = find_blocks(_fused_kv_model("a1", "b1"))
    assert report.blocks == [] and "KV cache" in report.refusal and "a1_k -> b1_k" in report.refusal
    assert "guessed" not in report.refusal and not caplog.records


def test_kv_cache_name_fallback_is_logged(caplog):
    """An input and an output named like a cache with no structural link the tests know: refused, and the
    log says the cache was guessed from names."""
    import onnx
    from onnx import TensorProto, helper
    from onnx import numpy_helper as nh

    w = nh.from_array(np.eye(8, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["x", "h"], ["y"]),
             helper.make_node("Mul", ["past_key", "past_key"], ["present_key"])]
    g = helper.make_graph(nodes, "kvname", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", 8]),
                                            helper.make_tensor_value_info("past_key", TensorProto.FLOAT, ["B", "P", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", 8]),
                           helper.make_tensor_value_info("present_key", TensorProto.FLOAT, ["B", "P", 8])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with caplog.at_level("WARNING", logger="onnx_consensus"):
        report = find_blocks(model)
    assert report.blocks == [] and "guessed from names" in report.refusal
    assert any("guessed from tensor names" in r.getMessage() for r in caplog.records)
    renamed = randomize_names(model, seed=1)  # the same graph without the names: its block is found
    assert len(find_blocks(renamed).blocks) == 1


# ---------------------------------------------------------------- issue 12 failure 3: shapes ONNX leaves unknown

def test_blocks_found_where_onnx_shape_inference_leaves_shapes_unknown():
    """A Paddle-style Reshape to Shape(x)[0:2] + [-1] at opset 12: ONNX's inference gives the tokens no rank,
    so main found 0 blocks ("shape unknown after shape inference"); onnxruntime's symbolic inference, the
    fall-back detection shares with the MAC counter, finds both sub-blocks. A -1 batch changes nothing."""
    from tests import shape_graphs as sg

    for batch in ("N", -1):
        report = find_blocks(sg.paddle_flatten(batch))
        assert [b.id for b in report.blocks] == ["res1", "y"], report.not_removable
        assert report.blocks[0].entry == "tok" and report.blocks[0].shape[2] == 8
        assert not report.not_removable


def test_minus_one_dims_do_not_split_shapes():
    """A -1 dim (Paddle's batch) is dynamic like a symbolic one: a residual block on a -1-batch input matches."""
    from onnx import TensorProto, helper

    from tests import shape_graphs as sg

    m = sg.paddle_flatten(-1, opset=17)  # ONNX alone resolves this one; the batch stays -1 at the input
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
    assert len(find_blocks(m).blocks) == 2
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 8])
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], np.eye(8, dtype=np.float32).ravel())
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["x", "h"], ["y"])],
                          "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 8])], [w])
    report = find_blocks(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert [b.id for b in report.blocks] == ["y"] and report.blocks[0].shape == (None, 8)


@pytest.mark.real
def test_real_ppocr_rec_sub_blocks_found():
    """ppocr_rec (Paddle, two pre-LN transformer layers behind a CNN): main found 0 of its 4 sub-blocks."""
    import onnx

    from tests import shape_graphs as sg

    report = find_blocks(onnx.load(sg.real_model("ppocr_rec")))
    assert len(report.blocks) == 4, report.not_removable
    assert not any("shape unknown" in n.reason for n in report.not_removable)
