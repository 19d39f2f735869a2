"""Models with several inputs and several outputs, and inputs that are not images: tabular features,
audio frames (N, T, F), token ids. The pruned model keeps every input and output (names, dtypes, dynamic
axes); zero-branch blocks come out with all outputs unchanged."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh

from onnx_consensus.cli import main
from onnx_consensus.graph.blocks import find_blocks
from onnx_consensus.graph.ir import interface
from tests.helpers import run


def two_tower(zero: tuple[str, ...] = ()) -> onnx.ModelProto:
    """features (N,16) -> 3 residual MLP blocks 't0..t2'; frames (N,T,8) -> 3 residual blocks 'a0..a2' applied
    per frame, mean over T; concat -> outputs class_logits (N,5) and score (N,1). ``zero``: blocks whose
    branch weight is zero."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def block(name: str, x: str, width: int) -> str:
        w = np.zeros((width, width), np.float32) if name in zero else \
            (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(nh.from_array(w, f"{name}_w"))
        nodes.extend([h.make_node("MatMul", [x, f"{name}_w"], [f"{name}_m"]),
                      h.make_node("Relu", [f"{name}_m"], [f"{name}_r"]),
                      h.make_node("Add", [x, f"{name}_r"], [f"{name}_out"])])
        return f"{name}_out"

    x = "features"
    for k in range(3):
        x = block(f"t{k}", x, 16)
    a = "frames"
    for k in range(3):
        a = block(f"a{k}", a, 8)
    inits += [nh.from_array(np.array([1], np.int64), "axis_t"),
              nh.from_array((rng.standard_normal((24, 5)) * 0.5).astype(np.float32), "head_c"),
              nh.from_array((rng.standard_normal((24, 1)) * 0.5).astype(np.float32), "head_s")]
    nodes += [h.make_node("ReduceMean", [a, "axis_t"], ["pooled"], keepdims=0),
              h.make_node("Concat", [x, "pooled"], ["joint"], axis=1),
              h.make_node("MatMul", ["joint", "head_c"], ["class_logits"]),
              h.make_node("MatMul", ["joint", "head_s"], ["score"])]
    graph = h.make_graph(
        nodes, "two_tower",
        [h.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 16]),
         h.make_tensor_value_info("frames", TensorProto.FLOAT, ["batch", "time", 8])],
        [h.make_tensor_value_info("class_logits", TensorProto.FLOAT, ["batch", 5]),
         h.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _calib(folder, n=48, time=20, files=2):
    """npz files keyed by input name; the frame count differs between files (dynamic 'time' axis)."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    feeds = []
    for k in range(files):
        f = {"features": rng.standard_normal((n // files, 16)).astype(np.float32),
             "frames": rng.standard_normal((n // files, time + 5 * k, 8)).astype(np.float32)}
        np.savez(folder / f"part{k}.npz", **f)
        feeds.append(f)
    return feeds


def test_blocks_found_in_both_towers():
    ids = set(find_blocks(two_tower()).by_id())
    assert ids == {f"t{k}_out" for k in range(3)} | {f"a{k}_out" for k in range(3)}


def test_two_inputs_two_outputs_zero_blocks_removed_exactly(tmp_path):
    model = two_tower(zero=("t1", "a2"))
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    feeds = _calib(tmp_path / "c")
    assert main([str(src), str(out), "--calib", str(tmp_path / "c"), "--remove", "2", "--only", "t1_out,a2_out",
                 "-q", "--no-latency", "--report", str(tmp_path / "r.json")]) == 0
    pruned = onnx.load(out)
    assert interface(pruned) == interface(model)  # names, dtypes and the symbolic batch/time axes
    assert sorted(json.loads((tmp_path / "r.json").read_text())["removed_ids"]) == ["a2_out", "t1_out"]
    for feed in feeds:  # two frame counts: the dynamic axis still works
        for got, want in zip(run(pruned, feed), run(model, feed)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_two_inputs_scored_by_consensus(tmp_path):
    """The full default criterion on a two-output regression/classification model: it runs, removes what
    was asked, and the output still has both heads."""
    model = two_tower()
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    feeds = _calib(tmp_path / "c", n=64)
    assert main([str(src), str(out), "--calib", str(tmp_path / "c"), "--remove", "3", "-q", "--no-latency",
                 "--keep-per-stage", "1"]) == 0
    pruned = onnx.load(out)
    assert interface(pruned) == interface(model)
    assert len(pruned.graph.node) == len(model.graph.node) - 9
    outs = run(pruned, feeds[0])
    assert [o.shape for o in outs] == [(32, 5), (32, 1)]


@pytest.mark.parametrize("missing", ["features", "frames"])
def test_missing_input_in_data_is_one_line_error(tmp_path, capsys, missing):
    src = tmp_path / "m.onnx"
    onnx.save(two_tower(), src)
    (tmp_path / "c").mkdir()
    arrays = {"features": np.zeros((8, 16), np.float32), "frames": np.zeros((8, 20, 8), np.float32)}
    arrays.pop(missing)
    np.savez(tmp_path / "c" / "d.npz", **arrays)
    code = main([str(src), str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "c"), "--remove", "1", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and missing in err and len(err.strip().splitlines()) == 1
