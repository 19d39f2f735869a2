"""Large inline weights moved to a temporary file for the run, so that no step copies them (issue 25).

A model file with inline weights is one protobuf: every ``ModelProto`` copy (``CopyFrom`` before an edit,
graphsurgeon import/export, ``SerializeToString`` for a session) and every session built from bytes holds its
own copy of them; a decoder run made several such copies at once (7.3x the file at 145M parameters). Written
once to a temporary external-data file, the weights are memory maps shared by every reader and session
(``graph.weights.external_array``, ``runtime.make_session``): copies of the proto copy the graph only. The
pruned model is written with its weights inline again (``graph.weights.write_inline``, one tensor at a time),
so the output keeps the input's layout.
"""
from __future__ import annotations

import os
import tempfile

import onnx

from ..graph.weights import initializer_bytes, is_external, write_external

__all__ = ["Spill", "spill_weights"]

DATA_NAME = "weights.bin"


class Spill:
    """The temporary folder holding spilled weights; it must live as long as the models that map them."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="onnx-consensus-weights-")
        self.path = os.path.join(self._dir.name, DATA_NAME)

    def close(self) -> None:
        self._dir.cleanup()


def spill_weights(model: onnx.ModelProto, min_bytes: int) -> tuple[onnx.ModelProto, Spill | None]:
    """Move ``model``'s inline initializers of at least 1 KiB to a temporary data file (absolute location,
    4 KiB aligned), when their total is at least ``min_bytes`` and none is external already. Returns (the
    model, the Spill: keep it while the model or its copies are used); (``model`` itself, None) when nothing
    moved. After a spill the model returned is a compact copy, and the caller should drop ``model``: a parsed
    protobuf keeps the bytes taken out of it in its arena for as long as it lives (550 MB of a 139M-parameter
    model for the whole run)."""
    if any(is_external(t) for t in model.graph.initializer) or initializer_bytes(model) < min_bytes:
        return model, None
    spill = Spill()
    with open(spill.path, "wb") as f:
        write_external(model, f, spill.path)
    compact = onnx.ModelProto()
    compact.CopyFrom(model)
    return compact, spill
