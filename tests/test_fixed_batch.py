"""Models as users bring them (issue 12): a fixed batch, no removable block, time-major outputs, rank-0 and
state inputs, `bench` without data, MACs at the calibration data's shapes. Small graphs built here."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_consensus.batching import fixed_batch, per_sample
from onnx_consensus.cli import main
from onnx_consensus.data import load_calibration
from onnx_consensus.errors import InputError, first_lines
from onnx_consensus.evaluate import reference_outputs
from onnx_consensus.graph.blocks import find_blocks
from onnx_consensus.graph.ir import interface
from onnx_consensus.scoring import collect_features
from tests.helpers import residual_mlp, run


def _with_batch(model: onnx.ModelProto, batch: int | str) -> onnx.ModelProto:
    """A copy whose inputs' and outputs' dim 0 is ``batch`` (an int: fixed; a str: symbolic)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for v in list(m.graph.input) + list(m.graph.output):
        d = v.type.tensor_type.shape.dim[0]
        d.Clear()
        if isinstance(batch, int):
            d.dim_value = batch
        else:
            d.dim_param = batch
    return m


def _calib(path, n: int, width: int = 16, seed: int = 0):
    path.mkdir()
    np.save(path / "x.npy", np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32))
    return path


# ------------------------------------------------------------------------------------------------ 1 fixed batch

@pytest.mark.parametrize("batch", [1, 2])
def test_fixed_batch_prunes_and_matches_dynamic_batch(tmp_path, batch, caplog):
    """On main: exit 1, "Got invalid dimensions for input". Now: exit 0, the same removals and the same
    hold-out fidelity as the same weights with a dynamic batch (23 samples: batch 2 pads its last batch)."""
    calib = _calib(tmp_path / "c", 23)
    outs = {}
    for name, b in (("fixed", batch), ("dynamic", "N")):
        src = tmp_path / f"{name}.onnx"
        onnx.save(_with_batch(residual_mlp(4), b), src)
        out, rep = tmp_path / f"{name}_out.onnx", tmp_path / f"{name}.json"
        assert main([str(src), str(out), "--calib", str(calib), "--remove", "2", "--threads", "1", "-q",
                     "--latency-runs", "2", "--report", str(rep)]) == 0
        outs[name] = json.loads(rep.read_text())
        if name == "fixed":
            assert interface(onnx.load(out)) == interface(onnx.load(src))  # the fixed batch is kept
            x = np.ones((batch, 16), np.float32)
            assert run(onnx.load(out), {"x": x})[0].shape == (batch, 10)
            assert set(outs[name]["latency"]) == {str(batch)}  # timed at the fixed batch only
    assert f"fixed batch of {batch}" in caplog.text and caplog.text.count("fixed batch") == 1
    f, d = outs["fixed"], outs["dynamic"]
    assert f["removed_ids"] == d["removed_ids"]
    assert f["fidelity"]["n"] == d["fidelity"]["n"] == f["samples"]["holdout"] == 5
    assert f["fidelity"]["rel_error"] == pytest.approx(d["fidelity"]["rel_error"], rel=1e-5)
    assert f["fidelity"]["agreement"] == d["fidelity"]["agreement"]


def test_padding_is_ignored_in_features_and_outputs(tmp_path):
    """Batch 3, 10 samples: the last batch holds one real sample and two copies; features and reference
    outputs have exactly 10 rows, equal to the dynamic-batch model's."""
    calib = _calib(tmp_path / "c", 10)
    dyn = residual_mlp(3)
    fixed = _with_batch(dyn, 3)
    data_f, data_d = load_calibration(str(calib), fixed), load_calibration(str(calib), dyn)
    assert data_f.fixed_batch == 3 and data_d.fixed_batch is None
    counted = [(next(iter(f.values())).shape[0], n) for f, n in data_f.counted_batches(64)]
    assert counted == [(3, 3), (3, 3), (3, 3), (3, 1)]
    blocks = find_blocks(fixed).blocks
    ff = collect_features(fixed, data_f, blocks, batch_size=64, threads=1)
    fd = collect_features(dyn, data_d, find_blocks(dyn).blocks, batch_size=64, threads=1)
    for b in blocks:
        np.testing.assert_allclose(ff.after[b.id], fd.after[b.id], rtol=1e-5, atol=1e-6)
        assert ff.after[b.id].shape[0] == 10
    np.testing.assert_array_equal(ff.predictions, fd.predictions)
    idx = np.arange(10)
    ref_f = np.concatenate(reference_outputs(fixed, data_f, idx, threads=1))
    ref_d = np.concatenate(reference_outputs(dyn, data_d, idx, threads=1))
    np.testing.assert_allclose(ref_f, ref_d, rtol=1e-5, atol=1e-6)


def test_fixed_batch_helper():
    from onnx_consensus.graph.ir import TensorSpec as T

    f32 = np.dtype(np.float32)
    assert fixed_batch([T("x", f32, (1, 3, 8, 8))]) == 1
    assert fixed_batch([T("x", f32, (2, 4)), T("sr", np.dtype(np.int64), ())]) == 2
    assert fixed_batch([T("x", f32, ("N", 4)), T("state", f32, (2, None, 8))]) is None
    assert fixed_batch([T("x", f32, (-1, 4))]) is None
    assert fixed_batch([T("x", f32, (1, 4)), T("y", f32, (2, 4))]) is None


def test_onnxruntime_error_keeps_the_line_that_says_what_is_wrong():
    """onnxruntime's "Got invalid dimensions" puts "index: 0 Got: 3 Expected: 1" on its second line, which
    the one-line error used to cut off."""
    m = _with_batch(residual_mlp(2), 1)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception) as info:
        sess.run(None, {"x": np.zeros((3, 16), np.float32)})
    line = first_lines(info.value)
    assert "\n" not in line and "invalid dimensions" in line and "Got: 3" in line and "Expected: 1" in line


# ------------------------------------------------------------------------------------------ 2 no removable block

def _plain(tmp_path, batch=1):
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")])
    src = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), src)
    return src


@pytest.mark.parametrize("extra", [[], ["--remove", "2"]])
def test_no_removable_block_said_before_data_or_inference(tmp_path, capsys, monkeypatch, extra):
    """Nothing to remove: exit 0, said plainly, nothing written, and neither the data (here unreadable for
    the model: wrong width) nor onnxruntime is touched. On main: the data error (exit 2) or an inference."""
    src = _plain(tmp_path)
    calib = tmp_path / "c"
    calib.mkdir()
    np.save(calib / "x.npy", np.ones((12, 7), np.float32))  # would be refused if it were loaded

    def no_session(*a, **k):
        raise AssertionError("onnxruntime session created")
    monkeypatch.setattr(ort, "InferenceSession", no_session)
    out = tmp_path / "o.onnx"
    assert main([str(src), str(out), "--calib", str(calib), *extra]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("No removable block") and "nothing written" in printed
    assert not out.exists()


def test_no_removable_block_force_write(tmp_path, capsys):
    src = _plain(tmp_path)
    calib = _calib(tmp_path / "c", 12, width=4)
    out = tmp_path / "o.onnx"
    assert main([str(src), str(out), "--calib", str(calib), "--force-write", "-q"]) == 0
    assert out.exists()
    assert interface(onnx.load(out)) == interface(onnx.load(src))


# ------------------------------------------------------------------------------------- 7b time-major outputs

def _time_major(batch: int | str = "N", T: int = 5, C: int = 4, K: int = 6) -> onnx.ModelProto:
    """x (B, C, T) -> residual 1x1 Conv block -> 1x1 Conv to K -> Transpose -> y (T, B, K): a time-major
    output as CTC recognisers write it."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((C, C, 1)) * 0.5).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((K, C, 1)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["b"]), helper.make_node("Relu", ["b"], ["br"]),
             helper.make_node("Add", ["x", "br"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["z"]),
             helper.make_node("Transpose", ["z"], ["y"], perm=[2, 0, 1])]
    g = helper.make_graph(nodes, "tm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, C, T])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [T, batch, K])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("batch", ["N", 1])
def test_time_major_output_counts_samples_and_compares_per_sample(tmp_path, batch):
    """26 samples, 5 time steps: on main the report said 25 hold-out "samples" for 5 (rows x time steps).
    Now the hold-out count is the number of samples and each sample's (T, K) output is compared whole."""
    model = _time_major(batch)
    src = tmp_path / "tm.onnx"
    onnx.save(model, src)
    calib = tmp_path / "c"
    calib.mkdir()
    x = np.random.default_rng(1).standard_normal((26, 4, 5)).astype(np.float32)
    np.save(calib / "x.npy", x)
    data = load_calibration(str(calib), model)
    ref = reference_outputs(model, data, np.arange(26), batch_size=8, threads=1)
    got = np.concatenate(ref)
    assert got.shape == (26, 5, 6)  # samples first
    want = np.concatenate([run(model, {"x": x[i:i + 1]})[0].transpose(1, 0, 2) for i in range(26)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    rep = tmp_path / "r.json"
    assert main([str(src), str(tmp_path / "o.onnx"), "--calib", str(calib), "--remove", "1", "--threads", "1",
                 "--keep-per-stage", "0", "--no-latency", "-q", "--report", str(rep)]) == 0
    r = json.loads(rep.read_text())
    assert r["fidelity"]["n"] == r["samples"]["holdout"] == 5


def test_per_sample_refuses_mixed_rows():
    assert per_sample(np.zeros((7, 3)), 1).shape == (1, 7, 3)  # (T x 1, D) rows of one sample
    assert per_sample(np.zeros((7, 4, 3)), 4, 2).shape == (2, 7, 3)
    with pytest.raises(InputError, match="batch-size 1"):
        per_sample(np.zeros((14, 3)), 2)


# ----------------------------------------------------------------- 10 rank-0 inputs, state inputs, bench


def _stateful(tmp_path):
    """Inputs x (B, 8), state (2, B, 8) (its batch on axis 1), sr int64 rank 0; output y (B, 8) =
    x + Relu(x @ W) + state[0] + state[1] + sr * 0.001, stateN (2, B, 8)."""
    w = numpy_helper.from_array((np.random.default_rng(0).standard_normal((8, 8)) * 0.3).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["mr"]),
             helper.make_node("Add", ["x", "mr"], ["h"]),
             helper.make_node("ReduceSum", ["state"], ["s"], axes=[0], keepdims=0),
             helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["srf", "k"], ["srs"]),
             helper.make_node("Add", ["h", "s"], ["hs"]), helper.make_node("Add", ["hs", "srs"], ["y"]),
             helper.make_node("Add", ["state", "h"], ["stateN"])]
    g = helper.make_graph(
        nodes, "stateful",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, 8]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, None, 8])],
        [w, numpy_helper.from_array(np.array(0.001, np.float32), "k")])
    src = tmp_path / "stateful.onnx"
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    onnx.save(model, src)
    calib = tmp_path / "c"
    calib.mkdir()
    rng = np.random.default_rng(2)
    files = []
    for k, (n, sr) in enumerate(((6, 16000), (5, 8000))):
        arrays = {"x": rng.standard_normal((n, 8)).astype(np.float32),
                  "state": rng.standard_normal((2, n, 8)).astype(np.float32), "sr": np.array(sr, np.int64)}
        np.savez(calib / f"b{k}.npz", **arrays)
        files.append(arrays)
    return model, src, calib, files


def test_scalar_and_state_inputs_taken_as_given(tmp_path):
    """On main: "model input 'sr' is a scalar (rank 0)" (exit 2). Now: sr fed as given, per file; the
    state batched along its axis 1; every batch equals the file's slices."""
    model, src, calib, files = _stateful(tmp_path)
    data = load_calibration(str(calib), model)
    assert data.n_samples == 11 and data.batch_axes == {"x": 0, "state": 1, "sr": None}
    got = list(data.counted_batches(4))
    assert [n for _, n in got] == [4, 2, 4, 1]  # never across files (sr differs between them)
    feeds = got[1][0]
    np.testing.assert_array_equal(feeds["x"], files[0]["x"][4:6])
    np.testing.assert_array_equal(feeds["state"], files[0]["state"][:, 4:6])
    assert feeds["sr"].shape == () and int(feeds["sr"]) == 16000 and int(got[2][0]["sr"]) == 8000
    sub = list(data.batches(8, [1, 3, 7]))  # a subset crossing the two files
    np.testing.assert_array_equal(sub[0]["state"], files[0]["state"][:, [1, 3]])
    np.testing.assert_array_equal(sub[1]["state"], files[1]["state"][:, [1]])
    y = run(model, feeds)[0]
    assert y.shape == (2, 8)
    ref = np.concatenate(reference_outputs(model, data, np.arange(11), batch_size=4, threads=1))
    assert ref.shape == (11, 8)


def test_state_input_without_a_batch_axis_refused(tmp_path):
    model, src, calib, files = _stateful(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "b.npz", x=np.zeros((3, 8), np.float32), state=np.zeros((2, 5, 8), np.float32),
             sr=np.array(16000, np.int64))
    with pytest.raises(InputError, match="state"):
        load_calibration(str(bad), model)


def test_bench_with_scalar_and_state_data(tmp_path, capsys):
    model, src, calib, files = _stateful(tmp_path)
    assert main(["bench", str(src), "--data", str(calib), "--batch-sizes", "1,3", "--runs", "2", "--warmup", "1",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["batch_size"] for r in rows] == [1, 3]


def test_bench_refuses_dynamic_dims_without_data(tmp_path, capsys):
    """On main: timed at 1 for every dynamic dim (a 1x1 image), exit 0. Now exit 2 naming input and dims;
    --input-shape or --data makes it run."""
    src = tmp_path / "img.onnx"
    m = _with_batch(residual_mlp(2), "N")
    m.graph.input[0].type.tensor_type.shape.dim[1].Clear()
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "width"
    onnx.save(m, src)
    assert main(["bench", str(src), "--runs", "2", "--warmup", "1"]) == 2
    err = capsys.readouterr().err
    assert "'x'" in err and "dim 1 (width)" in err and "--input-shape" in err and err.count("\n") == 1
    assert main(["bench", str(src), "--runs", "2", "--warmup", "1", "--input-shape", "x:1x16", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["macs"] is not None


def test_bench_fixed_batch_times_that_batch(tmp_path, capsys):
    src = tmp_path / "fixed.onnx"
    onnx.save(_with_batch(residual_mlp(2), 1), src)
    assert main(["bench", str(src), "--runs", "2", "--warmup", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["batch_size"] for r in rows] == [1]


# ------------------------------------------------------------------------- MACs at the calibration shapes

def test_macs_at_calibration_shapes(tmp_path, caplog):
    """Dynamic non-batch dims and no --input-shape: MACs were "unknown"; now counted at the first calibration
    sample's shapes, which the run names."""
    from tests.helpers import tiny_residual_graph

    src = tmp_path / "seq.onnx"
    onnx.save(tiny_residual_graph(seq=True), src)
    calib = tmp_path / "c"
    calib.mkdir()
    np.save(calib / "x.npy", np.random.default_rng(0).standard_normal((20, 7, 4)).astype(np.float32))
    rep = tmp_path / "r.json"
    assert main([str(src), str(tmp_path / "o.onnx"), "--calib", str(calib), "--remove", "1", "--threads", "1",
                 "--keep-per-stage", "0", "--latency-runs", "2", "-q", "--report", str(rep)]) == 0
    r = json.loads(rep.read_text())
    assert r["macs"]["before"] == 1 * 7 * (16 + 16 + 12)  # tiny_residual_graph's closed form at N=1, S=7
    assert r["macs"]["after"] == 1 * 7 * (16 + 12)
    assert "x:1x7x4" in caplog.text


def test_ir3_model_keeps_initializers_as_inputs(tmp_path):
    """IR version 3 (the onnx package's zoo graphs): every initializer is also a graph input. On main the
    pruned model lost those inputs and the write check failed ("... in initializer but not in graph input")."""
    from onnx_consensus.graph.surgery import remove_blocks

    m = residual_mlp(3, opset=9)
    m.ir_version = 3
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(m)
    out = remove_blocks(m, find_blocks(m).blocks[:1])
    onnx.checker.check_model(out, full_check=True)
    assert {t.name for t in out.graph.initializer} <= {v.name for v in out.graph.input}
    assert interface(out) == interface(m)


def test_schedule_returns_before_inference_without_blocks(tmp_path, monkeypatch):
    """The API's schedule (``pruner.prune``) on a model with no block: no onnxruntime session, no error for
    a block-count target."""
    from onnx_consensus.options import TargetOptions
    from onnx_consensus.pruner import prune as schedule

    src = _plain(tmp_path, batch="N")
    calib = _calib(tmp_path / "c", 12, width=4)
    model = onnx.load(src)
    data = load_calibration(str(calib), model)

    def no_session(*a, **k):
        raise AssertionError("onnxruntime session created")
    monkeypatch.setattr(ort, "InferenceSession", no_session)
    result = schedule(model, data, target=TargetOptions(remove=2))
    assert result.removals == [] and result.stop_reason.startswith("no removable block")
    assert result.fidelity is None
