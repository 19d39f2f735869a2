"""Output kinds (issue 20): the registry, the text kinds' measures against closed cases, the per-channel
standardised measure's units invariance, --fidelity with a user's module, --output-kind parsing, the warnings
where a measure is blind, labels (boxes / landmarks are no class scores; a box decode or an embedding sum is no
projection shortcut; inspect says prune refuses a quantized graph), and --feature under --metrics output."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_consensus import find_blocks, load_calibration, pipeline
from onnx_consensus.cli import main
from onnx_consensus.errors import InputError
from onnx_consensus.evaluate import compare
from onnx_consensus.kinds.outputs import choose_feature, output_kinds
from onnx_consensus.kinds import Head, OutputPlan, output_plan
from onnx_consensus.kinds.measures import ChannelMeasure
from onnx_consensus.kinds.registry import RECOGNISERS, kind_spec, parse_override
from onnx_consensus.kinds.text import CTCMeasure, TextMapMeasure, ctc_decode, edit_distance, mask_iou, regions
from onnx_consensus.options import CriterionOptions, RunOptions, TargetOptions
from onnx_consensus.pruner import prune
from tests.helpers import residual_mlp

# ------------------------------------------------------------------------------------------------ CTC and DB


def _one_hot(ids, classes=5) -> np.ndarray:
    return np.eye(classes)[np.asarray(ids)]


def test_ctc_greedy_decode_and_character_error_rate():
    # blank 0; repeats collapse unless a blank separates them: [1 1 0 1 2 2 0] -> (1, 1, 2)
    seqs = _one_hot([[1, 1, 0, 1, 2, 2, 0], [3, 0, 0, 0, 0, 0, 4]])
    assert ctc_decode(seqs) == [(1, 1, 2), (3, 4)]
    assert edit_distance((1, 1, 2), (1, 2)) == 1 and edit_distance((), (3, 4)) == 2
    m = CTCMeasure(Head("ctc", ("y",)))
    out = _one_hot([[1, 1, 0, 1, 2, 2, 0], [3, 0, 0, 0, 0, 0, 3]])  # second string (3, 4) -> (3, 3): 1 edit
    m.add({"y": seqs}, {"y": out})
    r = m.result()
    assert r.value == 0.5 and r.details["char_error_rate"] == pytest.approx(1 / 5)  # 1 edit over 3 + 2 chars
    assert "strings equal 0.5000 (1 of 2)" in r.text


def test_db_mask_iou_and_regions():
    a = np.zeros((1, 1, 8, 8))
    a[0, 0, 1:3, 1:3] = 0.9  # two regions of 4 pixels
    a[0, 0, 5:7, 5:7] = 0.9
    b = a.copy()
    b[0, 0, 5:7, 5:7] = 0.2  # the second region falls under 0.3
    assert regions(a[0, 0] > 0.3) == 2 and regions(b[0, 0] > 0.3) == 1
    assert mask_iou(a[0, 0] > 0.3, b[0, 0] > 0.3) == pytest.approx(4 / 8)
    assert mask_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    m = TextMapMeasure(Head("text map", ("p",)))
    m.add({"p": a}, {"p": b})
    r = m.result()
    assert r.value == pytest.approx(0.5) and "text regions 2 -> 1" in r.text


# ------------------------------------------------------------------------------------------------ generic


def test_standardised_error_ignores_each_channels_units():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((40, 3))
    out = ref + 0.1 * rng.standard_normal((40, 3))

    def value(r, o):
        m = ChannelMeasure(Head("generic", ("y",)))
        m.add({"y": r}, {"y": o})
        return m.result()

    base = value(ref, out)
    # closed form: mean over channels of SSE_c / (n var_c); value exp(-err)
    want = np.mean(((out - ref) ** 2).sum(0) / (40 * ref.var(0)))
    assert base.damage == pytest.approx(want) and base.value == pytest.approx(np.exp(-want))
    scale, shift = np.array([640.0, 1.0, 0.001]), np.array([1e4, 0.0, 3.0])  # pixels, as is, thousandths
    assert value(ref * scale + shift, out * scale + shift).value == pytest.approx(base.value, rel=1e-9)
    # a tensor cosine is dominated by the pixel channel: an error on the small channel alone is invisible to it
    r2, o2 = ref * scale + shift, (out * scale + shift)
    o2[:, 1] = r2[:, 1] + 1.0  # channel 1 off by one standard deviation
    cos = np.mean(np.sum(r2 * o2, 1) / np.linalg.norm(r2, axis=1) / np.linalg.norm(o2, axis=1))
    assert cos > 0.9999 and value(r2, o2).value < 0.75


# ------------------------------------------------------------------------------------------------ --fidelity


def test_fidelity_function_from_a_user_module(tmp_path, monkeypatch):
    (tmp_path / "myfid.py").write_text(
        "import numpy as np\n"
        "def top1(orig, pruned):\n"
        "    return float(np.mean(orig['logits'].argmax(1) == pruned['logits'].argmax(1)))\n"
        "def bad(orig, pruned):\n"
        "    return 2.0\n")
    monkeypatch.chdir(tmp_path)
    model = residual_mlp(3)
    plan = output_plan(model, fidelity="myfid:top1")
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((10, 10))
    out = ref.copy()
    out[:3] = -out[:3]  # 3 of 10 rows flip their top-1
    f = compare([{"logits": out}], [{"logits": ref}], kinds=plan)
    assert f.measure == ("fidelity (myfid:top1)", pytest.approx(0.7)) and not f.meets(0.99)
    with pytest.raises(InputError, match="not a value in"):
        compare([{"logits": out}], [{"logits": ref}], kinds=output_plan(model, fidelity="myfid:bad"))
    with pytest.raises(InputError, match="no function nothere"):
        output_plan(model, fidelity="myfid:nothere")
    with pytest.raises(InputError, match="cannot import"):
        output_plan(model, fidelity="no_such_module_here:f")


def test_fidelity_function_decides_the_budget_in_a_run(tmp_path, monkeypatch):
    (tmp_path / "strict.py").write_text("def never(orig, pruned):\n    return 0.0\n")
    monkeypatch.chdir(tmp_path)
    model = residual_mlp(3)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((30, 16)).astype(np.float32))
    data = load_calibration(str(tmp_path), model)
    res = prune(model, data, criterion=CriterionOptions(fidelity="strict:never"), run=RunOptions(batch_size=8))
    assert res.removals == [] and "fidelity (strict:never) 0.0000 < 0.99" in res.stop_reason
    assert res.rounds[0].metrics == ("output_fidelity",)  # the preset ranks by the user's measure too


# ------------------------------------------------------------------------------------------------ --output-kind


def test_output_kind_parse_errors():
    outs = ["output0", "boxes", "scores"]
    assert parse_override("output0=yolov8:80", outs)[2] == (("classes", 80),)
    assert parse_override("output0=yolox", outs)[1].name == "yolov5"
    for spec, msg in [("output0", "expected NAME=KIND"), ("nothere=yolov8", "no float output 'nothere'"),
                      ("output0=yolov99", "unknown output kind"), ("output0=yolov8:many", "bad arguments"),
                      ("boxes=boxes:xywh", "bad arguments"), ("output0=yolov10:3", "takes no arguments")]:
        with pytest.raises(InputError, match=msg):
            parse_override(spec, outs)


def test_output_kind_override_and_cli_error(tmp_path, capsys):
    model = residual_mlp(2)
    assert output_kinds(model, overrides=("logits=generic",)) == {"logits": "generic"}
    with pytest.raises(InputError, match="needs its scores output"):
        output_kinds(model, overrides=("logits=boxes",))
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    np.save(tmp_path / "x.npy", np.zeros((4, 16), np.float32))
    code = main(["prune", str(src), str(tmp_path / "o.onnx"), "--calib", str(tmp_path), "--output-kind",
                 "logit=yolov8", "-q", "--no-latency"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no float output 'logit'" in err[0]
    assert not (tmp_path / "o.onnx").exists()


def test_recognisers_are_a_registry_switchable_by_name():
    assert {"detector", "text_map", "class_scores", "embedding"} <= set(RECOGNISERS)
    assert kind_spec("db").name == "text map" and kind_spec("yolov11").name == "yolov8"
    model = residual_mlp(2)
    plan = output_plan(model, skip=("class_scores",))
    assert plan.kinds == {"logits": "embedding"}  # (N, 10) without the class-score recogniser
    with pytest.raises(InputError, match="unknown output-kind recogniser"):
        output_plan(model, skip=("nope",))


# ------------------------------------------------------------------------------------------------ blind spots


def _one_class_mlp() -> onnx.ModelProto:
    """residual_mlp whose logits get +50 on class 3: every sample predicts class 3."""
    model = residual_mlp(3)
    model.graph.node[-1].output[0] = "z"
    bias = np.zeros(10, np.float32)
    bias[3] = 50.0
    model.graph.initializer.append(numpy_helper.from_array(bias, "bias"))
    model.graph.node.append(helper.make_node("Add", ["z", "bias"], ["logits"]))
    return model


def test_single_class_and_few_samples_are_said(tmp_path):
    model = _one_class_mlp()
    assert output_kinds(model) == {"logits": "class scores"}
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32))
    data = load_calibration(str(tmp_path), model)
    res = prune(model, data, run=RunOptions(batch_size=16))
    notes = " | ".join(res.notes)
    assert "class 3" in notes and "nearly blind" in notes and "KL" in notes
    assert "only 8 hold-out samples" in notes and "at least 100" in notes
    # the measure itself: one class everywhere, top-1 agreement 1.0 while the scores moved: exp(-KL) decides
    rng = np.random.default_rng(1)
    ref = 0.3 * rng.standard_normal((20, 4))
    ref[:, 0] += 10
    out = ref.copy()
    out[:, 0] -= 8  # still class 0 everywhere, but far less sure
    f = compare([{"y": out}], [{"y": ref}], kinds=OutputPlan((Head("class scores", ("y",)),)))
    assert f.outputs[0].agreement == 1.0 and f.measure[0] == "class-score exp(-KL)" and f.measure[1] < 0.99


def test_outputs_without_float_content_are_said(tmp_path):
    model = residual_mlp(3)
    model.graph.node.append(helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0))
    model.graph.output.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]))
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32))
    res = prune(model, load_calibration(str(tmp_path), model), target=TargetOptions(remove=1),
                run=RunOptions(batch_size=16))
    assert any("output label has no float content" in n for n in res.notes)


# ------------------------------------------------------------------------------------------------ labels


def _heads_model(outputs: dict[str, tuple[int, bool]]) -> onnx.ModelProto:
    """x (N, 8) -> one Gemm per output (width, softmax?)."""
    nodes, inits, outs = [], [], []
    for k, (name, (width, softmax)) in enumerate(outputs.items()):
        inits.append(numpy_helper.from_array(np.ones((8, width), np.float32), f"w{k}"))
        nodes.append(helper.make_node("MatMul", ["x", f"w{k}"], [name if not softmax else f"z{k}"]))
        if softmax:
            nodes.append(helper.make_node("Softmax", [f"z{k}"], [name], axis=1))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", width]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])], outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_boxes_and_landmarks_are_not_class_scores():
    face = _heads_model({"conf": (2, True), "out1": (4, False), "out2": (10, False)})
    kinds = output_kinds(face)
    assert kinds["conf"] == "class scores" and kinds["out1"] == kinds["out2"] == "generic"
    alone = _heads_model({"bbox": (4, False)})
    assert output_kinds(alone) == {"bbox": "generic"}
    assert not choose_feature(alone).head  # its Gemm is not "the classifier head"
    assert output_kinds(_heads_model({"logits": (4, False)})) == {"logits": "class scores"}  # as before


def _graph(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]))


def test_embedding_sum_and_box_decode_are_no_projection_shortcut():
    f = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT, s)  # noqa: E731
    i64 = lambda n, s: helper.make_tensor_value_info(n, TensorProto.INT64, s)  # noqa: E731
    emb = _graph([helper.make_node("Gather", ["word", "ids"], ["we"]),
                  helper.make_node("Shape", ["ids"], ["shp"]),
                  helper.make_node("Gather", ["shp", "one"], ["len"], axis=0),
                  helper.make_node("Range", ["zero", "len", "step"], ["pos"]),
                  helper.make_node("Gather", ["posw", "pos"], ["pe"]),
                  helper.make_node("Add", ["we", "pe"], ["e"])],
                 [i64("ids", [1, 6])], [f("e", [1, 6, 4])],
                 [numpy_helper.from_array(np.ones((20, 4), np.float32), "word"),
                  numpy_helper.from_array(np.ones((6, 4), np.float32), "posw"),
                  numpy_helper.from_array(np.array(1, np.int64), "one"),
                  numpy_helper.from_array(np.array(0, np.int64), "zero"),
                  numpy_helper.from_array(np.array(1, np.int64), "step")])
    assert find_blocks(emb).not_removable == []
    c = lambda v, n: numpy_helper.from_array(np.asarray(v, np.int64), n)  # noqa: E731
    decode = _graph([helper.make_node("Conv", ["x", "w"], ["d"]),
                     helper.make_node("Slice", ["d", "s0", "s2", "ax"], ["lt"]),
                     helper.make_node("Slice", ["d", "s2", "s4", "ax"], ["rb"]),
                     helper.make_node("Sub", ["anchor", "lt"], ["x1y1"]),
                     helper.make_node("Add", ["anchor", "rb"], ["x2y2"]),
                     helper.make_node("Add", ["x1y1", "x2y2"], ["c2"])],
                    [f("x", [1, 3, 4, 4])], [f("c2", [1, 2, 4, 4])],
                    [numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w"),
                     numpy_helper.from_array(np.ones((1, 2, 4, 4), np.float32), "anchor"),
                     c([0], "s0"), c([2], "s2"), c([4], "s4"), c([1], "ax")])
    assert find_blocks(decode).not_removable == []
    proj = _graph([helper.make_node("Conv", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                   helper.make_node("Conv", ["b", "w2"], ["br"]), helper.make_node("Conv", ["x", "w3"], ["sk"]),
                   helper.make_node("Add", ["br", "sk"], ["y"])],
                  [f("x", [1, 3, 4, 4])], [f("y", [1, 5, 4, 4])],
                  [numpy_helper.from_array(np.ones(s, np.float32), n) for n, s in
                   (("w1", (5, 3, 1, 1)), ("w2", (5, 5, 1, 1)), ("w3", (5, 3, 1, 1)))])
    assert "projection shortcut" in find_blocks(proj).not_removable[0].reason  # still said for a real one


def test_inspect_says_finetuning_refuses_a_quantized_graph(tmp_path, capsys):
    model = residual_mlp(2)
    model.graph.node[0].output[0] = "m0q"
    model.graph.initializer.extend([numpy_helper.from_array(np.array(0.1, np.float32), "sc"),
                                    numpy_helper.from_array(np.array(0, np.int8), "zp")])
    model.graph.node.insert(1, helper.make_node("QuantizeLinear", ["m0q", "sc", "zp"], ["q"]))
    model.graph.node.insert(2, helper.make_node("DequantizeLinear", ["q", "sc", "zp"], ["m0"]))
    path = tmp_path / "q.onnx"
    onnx.save(model, path)
    out = pipeline.inspect(path)
    assert out["finetune_refuses"] and "fine-tuning a quantized graph" in out["finetune_refuses"]
    assert main(["inspect", str(path)]) == 0
    assert "prune removes blocks from this model; fine-tuning a quantized graph" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ --feature


def test_feature_is_refused_when_only_output_metrics_would_read_it(tmp_path):
    model = residual_mlp(3)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32))
    data = load_calibration(str(tmp_path), model)
    with pytest.raises(InputError, match="--feature h1 is read only by representation metrics"):
        prune(model, data, criterion=CriterionOptions(metrics=("output",), feature="h1"),
              target=TargetOptions(remove=1), run=RunOptions(batch_size=16))
    with pytest.raises(InputError, match="--feature h1"):  # the default criterion without fine-tuning, too
        pipeline.prune(model, str(tmp_path), criterion=CriterionOptions(feature="h1"), target=TargetOptions(remove=1))
    # with a representation metric the named tensor is what is compared: scores differ from the default feature
    named = prune(model, data, criterion=CriterionOptions(metrics=("cka",), feature="h1"),
                  target=TargetOptions(remove=1), run=RunOptions(batch_size=16))
    default = prune(model, data, criterion=CriterionOptions(metrics=("cka",)), target=TargetOptions(remove=1),
                    run=RunOptions(batch_size=16))
    assert named.rounds[0].feature == "h1" != default.rounds[0].feature
    assert [b.scores for b in named.rounds[0].blocks] != [b.scores for b in default.rounds[0].blocks]


def test_finetune_names_an_embedding_cosine_and_samples(tmp_path, capsys):
    """`finetune` on an embedding model: its measure is the embedding cosine (never "agreement"), and what it
    counts are samples (the data may be audio or text, not images)."""
    pytest.importorskip("torch")
    from onnx_consensus.graph.surgery import remove_blocks

    model = residual_mlp(3)
    del model.graph.node[-1]  # no head: the output is the last block's exit h2, an (N, 16) embedding
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("h2", TensorProto.FLOAT, ["N", 16]))
    assert output_kinds(model) == {"h2": "embedding"}
    onnx.save(model, tmp_path / "t.onnx")
    onnx.save(remove_blocks(model, find_blocks(model).blocks[:1]), tmp_path / "s.onnx")
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "x.npy", np.random.default_rng(0).standard_normal((24, 16)).astype(np.float32))
    code = main(["finetune", str(tmp_path / "s.onnx"), str(tmp_path / "o.onnx"), "--teacher", str(tmp_path / "t.onnx"),
                 "--train", str(data), "--eval", str(data), "--ft-batch-size", "8", "--ft-max-steps", "1", "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "embedding cosine on" in out and "agreement" not in out
    assert "samples seen" in out and "images" not in out


def test_few_original_detections_are_said():
    from onnx_consensus.kinds import blind_spots
    from tests import detectors
    from tests.helpers import run

    model = detectors.build("yolov8")
    ref = [dict(zip(["output0"], run(model, {"images": detectors.images(10)})))]
    notes = blind_spots(output_plan(model), ref, budget=0.99)
    assert any("original detections on the hold-out" in n for n in notes)
    assert any("only 10 hold-out samples" in n for n in notes)
    assert not any("detections on the hold-out" in n for n in blind_spots(output_plan(model), ref))  # no budget


def test_feature_for_the_finetuning_mse_is_not_refused(tmp_path):
    pytest.importorskip("torch")
    from onnx_consensus.options import FinetuneConfig

    model = residual_mlp(3)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32))
    out = pipeline.prune(model, str(tmp_path), criterion=CriterionOptions(metrics=("output",), feature="h1"),
                         target=TargetOptions(remove=1), run=RunOptions(batch_size=8),
                         finetune=FinetuneConfig(epochs=1, max_steps=1, feature_mse=1.0, feature="h1", batch_size=8))
    assert out.removed_ids and out.result.rounds[0].metrics == ("output_kl",)
