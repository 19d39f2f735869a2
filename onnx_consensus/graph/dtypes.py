"""Which element types are floating point: the one home of that fact, for ONNX element types (``TensorProto``
enums: initializers, value infos) and NumPy dtypes (ml_dtypes' bfloat16 / float8 / float4 included)."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

__all__ = ["FLOAT_TYPES", "is_float", "is_float_type"]

#: ONNX element types that are floating point: the types of learned weights, counted as parameters and
#: stubbed in weight-free copies.
FLOAT_TYPES = frozenset(
    t
    for t in (
        TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16,
        getattr(TensorProto, "FLOAT8E4M3FN", None), getattr(TensorProto, "FLOAT8E4M3FNUZ", None),
        getattr(TensorProto, "FLOAT8E5M2", None), getattr(TensorProto, "FLOAT8E5M2FNUZ", None),
        getattr(TensorProto, "FLOAT4E2M1", None), getattr(TensorProto, "FLOAT8E8M0", None),
    )
    if t is not None
)


def is_float(dt: np.dtype) -> bool:
    """Floating point, including ml_dtypes' bfloat16 / float8 / float4 (numpy kind 'V')."""
    return dt.kind == "f" or dt.name.startswith(("bfloat16", "float8", "float4"))


def is_float_type(dtype) -> bool:
    """Whether ``dtype`` is floating point: an ONNX element type (int, ``FLOAT_TYPES``), a NumPy dtype or type
    (``is_float``), or None (unknown: counts as float)."""
    if dtype is None:
        return True
    if isinstance(dtype, int):
        return dtype in FLOAT_TYPES
    if getattr(dtype, "name", str(dtype)).startswith(("bfloat16", "float8", "float4")):
        return True
    try:
        return is_float(np.dtype(dtype))
    except TypeError:
        return False
