"""Large inline weights moved to a temporary file for the run, so that no step copies them (issue 25).

A model file with inline weights is one protobuf: every ``ModelProto`` copy (``CopyFrom`` before an edit,
graphsurgeon import/export, ``SerializeToString`` for a session) and every session built from bytes holds its
own copy of them; a decoder run made several such copies at once (7.3x the file at 145M parameters). Written
once to a temporary external-data file, the weights are memory maps shared by every reader and session
(``graph.weights.external_array``, ``runtime.make_session``): copies of the proto copy the graph only. The
pruned model gets its weights back inline before it is written, so the output keeps the input's layout.
"""
from __future__ import annotations

import os
import tempfile

import onnx
from onnx import numpy_helper

from ..graph.weights import external_array, initializer_bytes, is_external, write_external

__all__ = ["Spill", "spill_weights", "inline_weights"]

DATA_NAME = "weights.bin"


class Spill:
    """The temporary folder holding spilled weights; it must live as long as the models that map them."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="onnx-consensus-weights-")
        self.path = os.path.join(self._dir.name, DATA_NAME)

    def close(self) -> None:
        self._dir.cleanup()


def spill_weights(model: onnx.ModelProto, min_bytes: int) -> Spill | None:
    """Move ``model``'s inline initializers of at least 1 KiB to a temporary data file, in place (absolute
    location, 4 KiB aligned), when their total is at least ``min_bytes`` and none is external already.
    Returns the Spill (keep it while ``model`` or its copies are used), or None when nothing moved."""
    if any(is_external(t) for t in model.graph.initializer) or initializer_bytes(model) < min_bytes:
        return None
    spill = Spill()
    with open(spill.path, "wb") as f:
        write_external(model, f, spill.path)
    return spill


def inline_weights(model: onnx.ModelProto, spill: Spill) -> None:
    """Bring the tensors of ``model`` that live in ``spill``'s file back inline, in place (before writing the
    output of an input whose weights were inline)."""
    for t in model.graph.initializer:
        if is_external(t) and any(e.key == "location" and e.value == spill.path for e in t.external_data):
            t.CopyFrom(numpy_helper.from_array(external_array(t).copy(), t.name))
