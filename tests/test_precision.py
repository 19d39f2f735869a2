"""float16 models: scored (metrics in float64), pruned, and written in float16 with the same interface."""
import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnx_consensus.cli import main
from onnx_consensus.graph.ir import interface
from tests.helpers import resnet_onnx, run


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in list(m.graph.input) + list(m.graph.output) + list(m.graph.value_info):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    return m


def test_float16_model_pruned_in_float16(tmp_path):
    half = to_float16(resnet_onnx(20, "folded"))
    src, out = tmp_path / "h.onnx", tmp_path / "o.onnx"
    onnx.save(half, src)
    calib = tmp_path / "c"
    calib.mkdir()
    x = np.random.default_rng(0).random((40, 3, 32, 32)).astype(np.float16)
    np.save(calib / "x.npy", x)
    assert main([str(src), str(out), "--calib", str(calib), "--remove", "2", "-q", "--no-latency"]) == 0
    pruned = onnx.load(out)
    assert interface(pruned) == interface(half)
    assert all(t.data_type == TensorProto.FLOAT16 for t in pruned.graph.initializer if t.data_type != TensorProto.INT64)
    y = run(pruned, {"input": x[:3]})[0]
    assert y.dtype == np.float16 and np.isfinite(y).all()


def test_bfloat16_scored_on_float32_shadow_written_in_bfloat16(tmp_path):
    """onnxruntime's CPU provider cannot run a bfloat16 MatMul; the tool scores a float32 shadow, says so,
    and writes the same removals into the bfloat16 model."""
    import ml_dtypes
    import onnxruntime as ort
    import pytest

    from onnx_consensus.graph.precision import float32_shadow, is_bfloat16
    from tests.helpers import residual_mlp

    bf16 = residual_mlp(6, 16, dtype=ml_dtypes.bfloat16)
    assert is_bfloat16(bf16)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED|not implemented|implementation"):
        ort.InferenceSession(bf16.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": np.zeros((1, 16), ml_dtypes.bfloat16)})
    shadow = float32_shadow(bf16)
    src, shadow_src = tmp_path / "b.onnx", tmp_path / "s.onnx"
    onnx.save(bf16, src)
    onnx.save(shadow, shadow_src)
    calib = tmp_path / "c"
    calib.mkdir()
    x = np.random.default_rng(0).standard_normal((60, 16)).astype(np.float32)
    np.save(calib / "x.npy", x)
    args = ["--calib", str(calib), "--remove", "2", "-q", "--no-latency", "--report"]
    assert main([str(src), str(tmp_path / "o.onnx"), *args, str(tmp_path / "r.json")]) == 0
    assert main([str(shadow_src), str(tmp_path / "o32.onnx"), *args, str(tmp_path / "r32.json")]) == 0
    import json

    removed = json.loads((tmp_path / "r.json").read_text())["removed_ids"]
    assert removed == json.loads((tmp_path / "r32.json").read_text())["removed_ids"] and len(removed) == 2
    pruned = onnx.load(tmp_path / "o.onnx")
    onnx.checker.check_model(pruned, full_check=True)
    assert interface(pruned) == interface(bf16)
    assert all(t.data_type == TensorProto.BFLOAT16 for t in pruned.graph.initializer)
    assert len(pruned.graph.node) == len(bf16.graph.node) - 6
    # the bfloat16 output, computed in float32, is the float32 run's pruned model exactly
    y = run(float32_shadow(pruned), {"x": x[:8]})[0]
    np.testing.assert_array_equal(y, run(onnx.load(tmp_path / "o32.onnx"), {"x": x[:8]})[0])


def test_bfloat16_finetune_refused(tmp_path, capsys):
    import ml_dtypes

    from tests.helpers import residual_mlp

    src = tmp_path / "b.onnx"
    onnx.save(residual_mlp(4, 8, dtype=ml_dtypes.bfloat16), src)
    calib = tmp_path / "c"
    calib.mkdir()
    np.save(calib / "x.npy", np.zeros((20, 8), np.float32))
    code = main([str(src), str(tmp_path / "o.onnx"), "--calib", str(calib), "--remove", "1", "-q",
                 "--finetune-epochs", "1"])
    assert code == 2 and not (tmp_path / "o.onnx").exists()
    assert "bfloat16" in capsys.readouterr().err


def test_bfloat16_calibration_arrays_prune_a_bfloat16_model(tmp_path):
    """Calibration arrays saved in bfloat16 (ml_dtypes) are read and converted for the float32 shadow: the
    run is the one with the same values given as float32 (same removals, same scores)."""
    import json

    import ml_dtypes

    from tests.helpers import residual_mlp

    bf16 = residual_mlp(6, 16, dtype=ml_dtypes.bfloat16)
    src = tmp_path / "b.onnx"
    onnx.save(bf16, src)
    x = np.random.default_rng(1).standard_normal((60, 16)).astype(ml_dtypes.bfloat16)
    reports = []
    for name, arr in (("bf", x), ("f32", x.astype(np.float32))):
        calib = tmp_path / name
        calib.mkdir()
        np.save(calib / "x.npy", arr)
        report = tmp_path / f"{name}.json"
        assert main([str(src), str(tmp_path / f"{name}.onnx"), "--calib", str(calib), "--remove", "2", "-q",
                     "--no-latency", "--report", str(report)]) == 0
        reports.append(json.loads(report.read_text()))
    assert np.load(tmp_path / "bf" / "x.npy").dtype == np.dtype("V2")  # numpy alone cannot read it as numbers
    assert reports[0]["removed_ids"] == reports[1]["removed_ids"] and len(reports[0]["removed_ids"]) == 2
    for a, b in zip(reports[0]["rounds"], reports[1]["rounds"], strict=True):
        assert (a["order"], a["blocks"]) == (b["order"], b["blocks"])  # scores and ranks (timings differ)
