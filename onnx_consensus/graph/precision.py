"""bfloat16 models: onnxruntime's CPU provider has no kernels for most bfloat16 operators (Conv, MatMul,
Gemm, ...), so such a model is scored and pruned as a float32 shadow copy, and the removals are then applied
to the bfloat16 original, which is what gets written.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .weights import tensor_array

BF16, F32 = TensorProto.BFLOAT16, TensorProto.FLOAT


def is_bfloat16(model: onnx.ModelProto) -> bool:
    """Whether any interface tensor or initializer of the main graph is bfloat16."""
    g = model.graph
    return any(t.data_type == BF16 for t in g.initializer) or any(
        v.type.tensor_type.elem_type == BF16 for v in list(g.input) + list(g.output))


def _f32_tensor(t: TensorProto) -> TensorProto:
    return numpy_helper.from_array(np.asarray(tensor_array(t)).astype(np.float32), t.name)


def _shadow_graph(g: onnx.GraphProto) -> None:
    for i, t in enumerate(g.initializer):
        if t.data_type == BF16:
            g.initializer[i].CopyFrom(_f32_tensor(t))
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.tensor_type.elem_type == BF16:
            v.type.tensor_type.elem_type = F32
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.INT and a.name in ("to", "dtype") and a.i == BF16:
                a.i = F32
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == BF16:
                a.t.CopyFrom(_f32_tensor(a.t))
            elif a.type == onnx.AttributeProto.GRAPH:
                _shadow_graph(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _shadow_graph(sub)


def float32_shadow(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` computing in float32 wherever it computed in bfloat16: bfloat16 initializers,
    constants, interface and value_info types and Cast/ConstantOfShape targets become float32. Node and
    tensor names are unchanged, so block ids found on the shadow are the original's."""
    shadow = onnx.ModelProto()
    shadow.CopyFrom(model)
    _shadow_graph(shadow.graph)
    return shadow
