"""MAC and parameter counts: CIFAR ResNets (three exports) and hand-built graphs for each formula."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_consensus.errors import InputError
from onnx_consensus.graph import flops
from onnx_consensus.graph.flops import count_cost, parse_input_shape
from tests.helpers import resnet_onnx_path

torch = pytest.importorskip("torch")
from models.cifar_resnet import resnet  # noqa: E402


def cifar_resnet_macs(depth: int, num_classes: int = 10) -> int:
    """Conv + FC MACs of a CIFAR ResNet per 32x32 image, from the architecture."""
    n = (depth - 2) // 6

    def conv(c_in, c_out, k, hw):
        return hw * hw * c_out * c_in * k * k

    total = conv(3, 16, 3, 32)
    c_in, hw = 16, 32
    for stage, width in enumerate((16, 32, 64)):
        for i in range(n):
            if stage > 0 and i == 0:
                hw //= 2
            total += conv(c_in, width, 3, hw) + conv(width, width, 3, hw)
            if c_in != width:
                total += conv(c_in, width, 1, hw)  # projection shortcut
            c_in = width
    return total + 64 * num_classes


@pytest.fixture(scope="module")
def r56():
    """(torch ResNet-56, {form: ONNX path}): the torch model gives the parameter count (architecture only); the
    three exports are the suite's cached ones (tests.helpers), BN statistics distinct in every layer."""
    return resnet(56), {"fold": resnet_onnx_path(56, "folded"), "bn": resnet_onnx_path(56, "bn"),
                        "dynamo": resnet_onnx_path(56, "dynamo")}


@pytest.fixture(scope="module")
def r20():
    return resnet(20), resnet_onnx_path(20, "folded")


def test_architecture_formula():
    assert cifar_resnet_macs(56) == 125_747_840


@pytest.mark.parametrize("kind", ["fold", "bn", "dynamo"])
def test_resnet56_macs_and_params(r56, kind):
    model, paths = r56
    onnx_model = onnx.load(paths[kind])
    cost = count_cost(onnx_model)
    assert cost.total_macs == 125_747_840
    assert cost.total_macs == cifar_resnet_macs(56)
    conv_macs = [cost.macs_per_node[n.output[0]] for n in onnx_model.graph.node if n.op_type == "Conv"]
    assert len(conv_macs) == 57 and 0 not in conv_macs
    torch_params = sum(p.numel() for p in model.parameters())
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    has_bn = any(n.op_type == "BatchNormalization" for n in onnx_model.graph.node)
    if has_bn:  # BN kept: gamma, beta, running mean and running var per channel
        assert cost.params == torch_params + 2 * bn_channels
    else:  # BN folded: gamma merged into the conv weights, beta becomes the conv bias
        assert cost.params == torch_params - bn_channels
    assert kind != "bn" or has_bn


def test_resnet56_batch_size_scales(r56):
    model = onnx.load(r56[1]["fold"])
    assert count_cost(model, batch_size=4).total_macs == 4 * 125_747_840
    # shapes already inferred at batch 1 (stored in value_info) must not pin the batch size
    inferred = onnx.shape_inference.infer_shapes(flops._weight_free_copy(model, {}, 1))
    model.graph.value_info.extend(inferred.graph.value_info)
    assert count_cost(model, batch_size=4).total_macs == 4 * 125_747_840


def test_resnet20(r20):
    model, path = r20
    cost = count_cost(onnx.load(path))
    assert cost.total_macs == cifar_resnet_macs(20)
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert cost.params == sum(p.numel() for p in model.parameters()) - bn_channels


def test_no_second_copy_of_weights(r56, monkeypatch):
    """Shape inference must run on a copy without the large initializers' data."""
    model = onnx.load(r56[1]["bn"])
    seen = []
    real = onnx.shape_inference.infer_shapes

    def spy(m, *a, **kw):
        seen.append(m.ByteSize())
        return real(m, *a, **kw)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", spy)
    cost = count_cost(model)
    assert cost.total_macs == 125_747_840
    assert seen and seen[0] < model.ByteSize() / 20, (seen, model.ByteSize())


def test_external_data_not_loaded(r20, tmp_path):
    path = str(tmp_path / "ext.onnx")
    onnx.save(onnx.load(r20[1]), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)
    model = onnx.load(path, load_external_data=False)
    cost = count_cost(model)
    assert cost.total_macs == cifar_resnet_macs(20)
    assert cost.params == count_cost(onnx.load(r20[1])).params


# ---------------------------------------------------------------- hand-built graph


def init(name, shape, dtype=np.float32):
    return numpy_helper.from_array(np.ones(shape, dtype), name)


def hand_model(x_shape=(None, 8, 10, 10)):
    x_dims = ["N" if d is None else d for d in x_shape]
    nodes = [
        # grouped, strided conv: (N,8,10,10) -> (N,16,5,5), weight (16, 8/4, 3, 3)
        helper.make_node("Conv", ["x", "wc"], ["conv"], group=4, strides=[2, 2], pads=[1, 1, 1, 1]),
        # transposed conv: (N,16,5,5) -> (N,6,10,10), weight (16, 6/2, 2, 2), group 2
        helper.make_node("ConvTranspose", ["conv", "wt"], ["deconv"], group=2, strides=[2, 2]),
        helper.make_node("Relu", ["deconv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        # Gemm with transB: (N,6) x (7,6)^T -> (N,7)
        helper.make_node("Gemm", ["flat", "wg", "bg"], ["gemm"], transB=1),
        # batched MatMul with broadcasting: (2,1,4,5) x (3,5,6) -> (2,3,4,6)
        helper.make_node("MatMul", ["a", "b"], ["mm"]),
        # vector x matrix: (5,) x (5,6) -> (6,)
        helper.make_node("MatMul", ["v", "b2"], ["mv"]),
    ]
    g = helper.make_graph(
        nodes, "hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims),
         helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 1, 4, 5])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("gemm", "mm", "mv")],
        initializer=[init("wc", (16, 2, 3, 3)), init("wt", (16, 3, 2, 2)), init("wg", (7, 6)), init("bg", (7,)),
                     init("b", (3, 5, 6)), init("v", (5,)), init("b2", (5, 6)),
                     numpy_helper.from_array(np.array([1, 2], np.int64), "unused_int")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_each_formula():
    cost = count_cost(hand_model())
    m = cost.macs_per_node
    assert m["conv"] == 1 * 16 * 5 * 5 * (8 // 4) * 3 * 3
    assert m["deconv"] == 1 * 16 * 5 * 5 * (6 // 2) * 2 * 2
    assert m["gemm"] == 1 * 7 * 6
    assert m["mm"] == 2 * 3 * 4 * 6 * 5
    assert m["mv"] == 6 * 5
    assert m["relu"] == m["gap"] == m["flat"] == 0
    assert cost.total_macs == sum(m.values())
    assert cost.params == 16 * 2 * 9 + 16 * 3 * 4 + 42 + 7 + 90 + 5 + 30  # the int64 initializer is not counted


def test_gemm_trans_a():
    g = helper.make_graph(
        [helper.make_node("Gemm", ["a", "b"], ["y"], transA=1)], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[init("b", (3, 5))],
    )
    assert count_cost(helper.make_model(g)).macs_per_node["y"] == 4 * 5 * 3


def test_dynamic_non_batch_dim_unknown_then_fixed():
    model = hand_model(x_shape=(None, 8, None, None))
    cost = count_cost(model)
    assert cost.macs_per_node["conv"] is None and cost.macs_per_node["deconv"] is None
    assert cost.total_macs is None
    assert cost.macs_per_node["mm"] == 720 and cost.macs_per_node["relu"] == 0
    fixed = count_cost(model, input_shapes={"x": (1, 8, 10, 10)})
    assert fixed.total_macs == count_cost(hand_model()).total_macs
    doubled = count_cost(model, input_shapes={"x": (1, 8, 20, 20)})
    assert doubled.macs_per_node["conv"] == 4 * fixed.macs_per_node["conv"]
    with pytest.raises(InputError, match="not a model input"):
        count_cost(model, input_shapes={"nope": (1, 2)})
    with pytest.raises(InputError, match="rank"):
        count_cost(model, input_shapes={"x": (1, 8, 10)})
    with pytest.raises(InputError, match="fixes it to 8"):
        count_cost(model, input_shapes={"x": (1, 4, 10, 10)})


def test_reshape_shape_from_constant_data_propagated():
    """Shapes computed from small constants (Shape -> Concat -> Reshape) must survive weight stripping."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Concat", ["n", "minus1"], ["newshape"], axis=0),
        helper.make_node("Reshape", ["x", "newshape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["y"]),
    ]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array([0], np.int64), "zero"),
                     numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
                     init("w", (256, 10))],
    )
    assert count_cost(helper.make_model(g)).macs_per_node["y"] == 256 * 10


def test_constant_node_params():
    big = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones((4, 5), np.float32)))
    scalar = helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.array(2.0, np.float32)))
    ints = helper.make_node("Constant", [], ["i"], value=numpy_helper.from_array(np.ones(9, np.int64)))
    mm = helper.make_node("MatMul", ["x", "c"], ["y"])
    g = helper.make_graph([big, scalar, ints, mm], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    cost = count_cost(helper.make_model(g))
    assert cost.params == 20
    assert cost.macs_per_node["y"] == 4 * 5


def test_parse_input_shape():
    assert parse_input_shape("input:1x3x224x224") == ("input", (1, 3, 224, 224))
    assert parse_input_shape("input:0:1,128") == ("input:0", (1, 128))
    for bad in ("input", "input:", ":1x3", "input:1xx3", "input:1x-3", "input:1x0", "input:ax3"):
        with pytest.raises(InputError):
            parse_input_shape(bad)


def test_module_exports():
    assert {"ModelCost", "count_cost", "parse_input_shape"} <= set(flops.__all__)


def test_attention_macs_resolved_by_symbolic_inference():
    """The classic ViT export computes the head size by Div from Shape; ONNX inference leaves it unknown,
    onnxruntime's symbolic inference resolves it. Scores Q K^T: heads 4 x 17 tokens x 17 x head dim 16."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cost = count_cost(onnx.load(os.path.join(root, "models", "vit_fmnist.onnx")))
    assert cost.macs_per_node["/blocks.0/attn/MatMul_output_0"] == 4 * 17 * 17 * 16
    assert cost.macs_per_node["/blocks.0/attn/MatMul_1_output_0"] == 4 * 17 * 17 * 16
    assert cost.total_macs is not None


# ---------------------------------------------------------------- issue 12: shapes (failures 3, 4, 7, 8)

from onnx_consensus.graph.ir import tensor_spec  # noqa: E402
from onnx_consensus.graph.shapes import infer_shapes  # noqa: E402
from tests import shape_graphs as sg  # noqa: E402


def test_minus_one_dims_are_dynamic():
    """Failure 4: Paddle writes a dynamic batch as -1. It reads as dynamic, takes the batch size (not -1:
    main counted -6912 MACs), and --input-shape may set it."""
    m = sg.conv_minus_one()
    assert tensor_spec(m.graph.input[0]).shape == (None, 3, 8, 8)
    per_sample = 4 * 8 * 8 * 3 * 9
    assert count_cost(m).total_macs == per_sample
    assert count_cost(m, batch_size=3).total_macs == 3 * per_sample
    assert count_cost(m, {"x": (2, 3, 8, 8)}).total_macs == 2 * per_sample
    with pytest.raises(InputError, match="fixes it to 8"):
        count_cost(m, {"x": (2, 3, 5, 5)})
    dyn = sg.conv_minus_one(hw=(-1, -1))
    assert count_cost(dyn).total_macs is None
    assert count_cost(dyn, {"x": (1, 3, 5, 7)}).total_macs == 4 * 5 * 7 * 3 * 9


def test_symbolic_shape_inference_writes_nothing_in_the_working_directory(tmp_path, monkeypatch):
    """Failure 8: onnxruntime's symbolic inference, when it cannot complete (an op of an unknown domain),
    saves sym_shape_infer_temp.onnx (+ a .data file) in the working directory. Ours writes nothing."""
    monkeypatch.chdir(tmp_path)
    cost = count_cost(sg.custom_op_matmul())
    assert cost.total_macs is None  # the custom op's output shape stays unknown
    inferred = infer_shapes(sg.paddle_flatten())
    assert inferred.steps == ("declared", "onnx", "symbolic")
    assert os.listdir(tmp_path) == []


def test_one_shape_inference_onnx_then_symbolic():
    """Failure 3: ONNX's inference (opset 12) leaves the Reshape to Shape(x)[0:2] + [-1] without a rank;
    symbolic inference fills it, and only it: tensors ONNX resolved keep ONNX's shape."""
    m = sg.paddle_flatten()
    onnx_only = infer_shapes(m, enough=lambda *_: True)
    assert onnx_only.steps == ("declared", "onnx") and onnx_only.shapes["res1"] is None
    full = infer_shapes(m)
    assert len(full.shapes["res1"]) == 3 and full.shapes["res1"][2] == 8
    assert full.shapes["shp"] == onnx_only.shapes["shp"] == (4,)
    fixed = count_cost(m, {"x": (2, 8, 4, 4)})  # 2 MatMuls of (2, 16, 8) x (8, 8)
    assert fixed.total_macs == 2 * (2 * 16 * 8 * 8)


def test_if_counts_the_costlier_branch_and_says_so():
    """Failure 7: MACs inside If were 0. The costlier branch is counted (x @ w @ w: 2 * 2*8*8)."""
    cost = count_cost(sg.if_matmuls())
    assert cost.total_macs == 2 * (2 * 8 * 8)
    assert cost.macs_per_node["y"] == 256
    assert any("If" in n and "costlier branch" in n for n in cost.notes)
    assert count_cost(sg.if_matmuls(batch="N"), batch_size=3).total_macs == 2 * (3 * 8 * 8)
    assert count_cost(sg.if_matmuls(batch="N"), {"x": (1, 8)}).total_macs == 128


def test_if_with_unknown_shapes_is_unknown_not_zero():
    m = sg.if_matmuls(batch="N")
    m.graph.input[0].type.tensor_type.shape.dim[1].Clear()  # x (N, ?): MACs depend on a dynamic dim
    m.graph.output[0].type.tensor_type.shape.dim[1].Clear()
    assert count_cost(m).total_macs is None


def test_loop_counts_one_iteration_and_says_so():
    cost = count_cost(sg.loop_matmul())
    assert cost.total_macs == 2 * 8 * 8
    assert any("Loop" in n and "one iteration" in n for n in cost.notes)


def _shape_conditioned_if(batch="N") -> onnx.ModelProto:
    """y = If(Shape(x)[0] == 1, then: x @ w, else: x @ w @ w), x (batch, 8): the condition follows from x's shape."""
    from onnx import TensorProto, helper

    m = sg.if_matmuls(batch=batch)
    nodes = [helper.make_node("Shape", ["x"], ["sx"]),
             helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.INT64, [], [0])),
             helper.make_node("Gather", ["sx", "zero"], ["n"], axis=0),
             helper.make_node("Constant", [], ["one"], value=helper.make_tensor("o", TensorProto.INT64, [], [1])),
             helper.make_node("Equal", ["n", "one"], ["c"])]
    nodes += list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    del m.graph.input[1]  # c is computed now
    onnx.checker.check_model(m, full_check=True)
    return m


def test_inlined_if_takes_the_branch_its_shape_condition_selects():
    """The MAC count's fallback for If branches whose shapes stay unknown (silero_vad): If nodes are inlined,
    the branch chosen by a condition that follows from the shapes (batch 1 -> then: 64 MACs; batch 3 -> else:
    2 * 3*8*8), else the given branch, and said undecided."""
    from onnx_consensus.graph.flops import _inline_ifs

    m = _shape_conditioned_if()
    one, decided = _inline_ifs(m, "else_branch", {"x": (1, 8)}, 1)
    assert decided and not any(n.op_type == "If" for n in one.graph.node)
    assert count_cost(one, {"x": (1, 8)}).total_macs == 64
    three, decided = _inline_ifs(m, "then_branch", {"x": (3, 8)}, 1)
    assert decided and count_cost(three, {"x": (3, 8)}).total_macs == 2 * 3 * 8 * 8
    valued, decided = _inline_ifs(sg.if_matmuls(batch="N"), "then_branch", {"x": (3, 8)}, 1)  # c is an input
    assert not decided and count_cost(valued, {"x": (3, 8)}).total_macs == 3 * 8 * 8


@pytest.mark.real
def test_real_silero_vad_macs_inside_if():
    """silero_vad: every Conv sits inside an If (main counted 0 MACs), behind an If on the sample rate and
    nested Ifs on the batch size. Neither inference resolves the shapes inside its branches (ONNX's loses the
    batch there, onnxruntime's symbolic inference stops on a branch output without a type), so without input
    shapes its MACs are unknown, never 0; with them the Ifs are inlined (the nested ones by their shape
    conditions) and the count equals a recount from the Conv and LSTM shapes onnxruntime produces at 16 kHz
    (576 samples: 512 + 64 of context)."""
    import numpy as np
    import onnxruntime as ort

    from onnx_consensus.graph.flops import _inline_ifs

    m = onnx.load(sg.real_model("silero_vad"))
    assert count_cost(m).total_macs is None
    shapes = {"input": (1, 576), "state": (2, 1, 128)}
    cost = count_cost(m, shapes)
    assert any("then branch" in n and "depends on input values" in n for n in cost.notes), cost.notes
    flat, _ = _inline_ifs(m, "then_branch", shapes, 1)  # then: sr == 16000
    convs = [n for n in flat.graph.node if n.op_type == "Conv"]
    lstms = [n for n in flat.graph.node if n.op_type == "LSTM"]
    names = list(dict.fromkeys([t for n in convs for t in (n.output[0], n.input[1])]
                               + [t for n in lstms for t in n.input[:3]]))
    have = {o.name for o in flat.graph.output}
    flat.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in names if t not in have)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(flat.SerializeToString(), so, providers=["CPUExecutionProvider"])
    vals = dict(zip(names, sess.run(names, {"input": np.zeros((1, 576), np.float32),
                                            "state": np.zeros((2, 1, 128), np.float32),
                                            "sr": np.array(16000, np.int64)})))
    recount = sum(vals[n.output[0]].size * int(np.prod(vals[n.input[1]].shape[1:])) for n in convs)
    assert recount == 548_480
    # the decoder's LSTM: steps x batch x (W + R) elements, X (T, N, input)
    lstm = sum(int(np.prod(vals[n.input[0]].shape[:2])) * (vals[n.input[1]].size + vals[n.input[2]].size)
               for n in lstms)
    assert len(lstms) == 1 and lstm == 1 * 1 * (512 * 128 + 512 * 128)
    assert cost.total_macs == recount + lstm


@pytest.mark.real
def test_real_ppocr_cls_minus_one_batch(tmp_path, monkeypatch):
    m = onnx.load(sg.real_model("ppocr_cls"))
    name = m.graph.input[0].name
    monkeypatch.chdir(tmp_path)
    assert count_cost(m, {name: (1, 3, 48, 192)}).total_macs > 0
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("op,gates", [("LSTM", 4), ("GRU", 3), ("RNN", 1)])
@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_recurrent_macs_closed_form(op, gates, layout, direction):
    """T steps x N samples x every gate's input and recurrent products: T * N * D * G * H * (I + H); the
    sequence length comes from --input-shape when the model leaves it symbolic."""
    T, N, I, H = 7, 3, 5, 6
    D = 2 if direction == "bidirectional" else 1
    x_shape = ["T", "N", I] if layout == 0 else ["N", "T", I]
    attrs = {"hidden_size": H, "direction": direction}
    if layout:
        attrs["layout"] = 1
    node = helper.make_node(op, ["x", "W", "R"], ["y"], **attrs)
    g = helper.make_graph([node], "rnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          initializer=[init("W", (D, gates * H, I)), init("R", (D, gates * H, H))])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    assert count_cost(model).total_macs is None  # dim 1 unknown (dim 0 counts as a batch of 1): never 0
    shape = (T, N, I) if layout == 0 else (N, T, I)
    assert count_cost(model, {"x": shape}).total_macs == T * N * D * gates * H * (I + H)
