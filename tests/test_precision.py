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
