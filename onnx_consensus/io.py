"""Writing the output model safely: a temporary file beside the target, checked, then renamed into place.

A partial or invalid output is never left behind: on any failure (or interrupt) the temporary file is
removed, and the target path is only ever replaced by a complete model that passed ``onnx.checker`` with
full shape inference and ran one batch in onnxruntime.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

import numpy as np
import onnx

from .errors import InputError
from .runtime import make_session

TWO_GB = 2**31 - 1


def check_output_path(path: str | os.PathLike, input_path: str | os.PathLike | None = None) -> str:
    """Fail early (InputError) when the output's directory is missing or it would overwrite the input."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise InputError(f"output directory does not exist: {folder}")
    if os.path.isdir(path):
        raise InputError(f"output path is a directory: {path}")
    if input_path is not None and os.path.exists(path) and os.path.samefile(path, os.fspath(input_path)):
        raise InputError("output path is the input model; the input is never overwritten, choose another path")
    return path


def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike,
                      check_feed: Mapping[str, np.ndarray] | None = None, *, threads: int | None = None) -> str:
    """Write ``model`` to ``path`` through a checked temporary file. Models over 2 GB are written with
    their weights as external data in ``<name>.data`` beside the output."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    external = model.ByteSize() > TWO_GB
    data_name = f"{name}.data"
    tmp_data = os.path.join(folder, f".{os.path.basename(tmp)}.data")
    try:
        if external:
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=os.path.basename(tmp_data), size_threshold=1024)
        else:
            onnx.save_model(model, tmp)
        onnx.checker.check_model(tmp, full_check=True)
        if check_feed is not None:
            sess = make_session(tmp, level="basic", threads=threads)
            sess.run(None, {i.name: check_feed[i.name] for i in sess.get_inputs()})
        if external:
            # Re-point the external-data location at the final data file name, then move both.
            m = onnx.load(tmp, load_external_data=False)
            for t in m.graph.initializer:
                for entry in t.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            onnx.save_model(m, tmp)
            os.replace(tmp_data, os.path.join(folder, data_name))
        os.replace(tmp, path)
    except BaseException:
        for f in (tmp, tmp_data):
            if os.path.exists(f):
                os.remove(f)
        raise
    return path
