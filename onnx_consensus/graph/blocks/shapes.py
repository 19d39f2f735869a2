"""Shape comparison shared by the detection modules."""
from __future__ import annotations

import onnx_graphsurgeon as gs

from ..ir import shape_of


def same_shape(a: gs.Tensor, b: gs.Tensor) -> bool:
    """Same rank and equal static dims; two symbolic or unknown dims are taken as equal (a graph output
    may declare its batch dim under another name than the input's)."""
    sa, sb = shape_of(a), shape_of(b)
    if sa is None or sb is None or len(sa) != len(sb):
        return False
    return all(x == y or not (isinstance(x, int) and isinstance(y, int)) for x, y in zip(sa, sb))
