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
    """Write ``model`` to ``path`` through a checked temporary file (``onnx.checker`` with full shape
    inference, then one onnxruntime run of ``check_feed``), then rename it into place.

    On Linux the temporary file is anonymous (O_TMPFILE): if the process is killed, even by SIGKILL,
    it vanishes with it. Models over 2 GB are written with their weights as external data in
    ``<name>.data`` beside the output (through named temporary files, removed on any error).
    """
    path = os.path.abspath(os.fspath(path))
    if model.ByteSize() > TWO_GB:
        return _save_external(model, path, check_feed, threads)
    folder = os.path.dirname(path)
    fd = _anonymous_file(folder)
    if fd is None:
        return _save_named(model, path, check_feed, threads)
    try:
        with os.fdopen(os.dup(fd), "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        _check(f"/proc/self/fd/{fd}", check_feed, threads)
        _link_into_place(fd, path)
    finally:
        os.close(fd)
    return path


def _anonymous_file(folder: str) -> int | None:
    """An unnamed file in ``folder`` (Linux O_TMPFILE), or None where that is not available."""
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o644)
    except OSError:
        return None


def _link_into_place(fd: int, path: str) -> None:
    """Give the anonymous file ``fd`` a temporary name beside ``path`` (linkat with AT_SYMLINK_FOLLOW on
    /proc/self/fd, which os.link does not do) and rename it over ``path``."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, at_symlink_follow = -100, 0x400
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    if os.path.lexists(tmp):
        os.remove(tmp)
    if libc.linkat(at_fdcwd, f"/proc/self/fd/{fd}".encode(), at_fdcwd, os.fsencode(tmp), at_symlink_follow):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def _check(source: str, check_feed, threads) -> None:
    onnx.checker.check_model(source, full_check=True)
    if check_feed is not None:
        sess = make_session(source, level="basic", threads=threads)
        sess.run(None, {i.name: check_feed[i.name] for i in sess.get_inputs()})


def _save_named(model, path, check_feed, threads) -> str:
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        onnx.save_model(model, tmp)
        _check(tmp, check_feed, threads)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _save_external(model, path, check_feed, threads) -> str:
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    data_name = f"{name}.data"
    tmp_data = os.path.join(folder, f".{os.path.basename(tmp)}.data")
    try:
        onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(tmp_data), size_threshold=1024)
        _check(tmp, check_feed, threads)
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
