"""Writing the output model safely: a temporary file beside the target, checked, then renamed into place.

The target path is only ever replaced by a complete model that passed ``onnx.checker`` with full shape
inference and ran one batch in onnxruntime. What a failure midway leaves behind:

* an exception, Ctrl-C, or SIGTERM under the CLI (which turns it into an exception): nothing, the
  temporaries are removed;
* SIGKILL (or a power cut), single-file output on Linux: nothing, the temporary file is anonymous
  (O_TMPFILE) until it is linked as ``.NAME.PID.tmp`` and renamed over the target in the next instant;
* SIGKILL, external-data output (``NAME`` + ``NAME.data``), or where O_TMPFILE is missing: the named
  temporaries ``.NAME.XXXXXXXX.tmp`` (and ``.tmp.data``) beside the target stay until removed by hand; the
  two final files are renamed one after the other, so a kill between those two renames leaves the new
  ``NAME.data`` beside the previous ``NAME`` (if there was one).
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

import numpy as np
import onnx

from .errors import InputError
from .graph.weights import relocate, write_external
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
                      check_feed: Mapping[str, np.ndarray] | None = None, *, threads: int | None = None,
                      external_data: bool = False, checker: bool = True) -> str:
    """Write ``model`` to ``path`` through a checked temporary file (``onnx.checker`` with full shape
    inference, then one onnxruntime run of ``check_feed`` unless it is None), then rename it into place.

    On Linux the temporary file is anonymous (O_TMPFILE): if the process is killed, even by SIGKILL,
    it vanishes with it. With ``external_data`` (the input kept its weights that way), and always for
    models over 2 GB, the weights go to ``<name>.data`` beside the output through *named* temporary files:
    removed on any exception or interrupt, but left behind by SIGKILL (see the module docstring).
    ``checker=False`` skips ``onnx.checker`` (for graphs with onnxruntime's operators in the default domain,
    which it refuses: onnxruntime-genai exports); the onnxruntime run still checks the model.
    """
    path = os.path.abspath(os.fspath(path))
    if external_data or model.ByteSize() > TWO_GB:
        return _save_external(model, path, check_feed, threads, checker)
    folder = os.path.dirname(path)
    fd = _anonymous_file(folder)
    if fd is None:
        return _save_named(model, path, check_feed, threads, checker)
    try:
        with os.fdopen(os.dup(fd), "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        _check(f"/proc/self/fd/{fd}", check_feed, threads, checker)
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


def _check(source: str, check_feed, threads, checker: bool = True) -> None:
    if checker:
        onnx.checker.check_model(source, full_check=True)
    if check_feed is not None:
        sess = make_session(source, level="basic", threads=threads)
        sess.run(None, {i.name: check_feed[i.name] for i in sess.get_inputs()})


def _save_named(model, path, check_feed, threads, checker: bool = True) -> str:
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        onnx.save_model(model, tmp)
        _check(tmp, check_feed, threads, checker)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _save_external(model, path, check_feed, threads, checker: bool = True) -> str:
    """Write the proto to a temporary ``.onnx`` and its weights, streamed tensor by tensor (memory-mapped
    external tensors are copied from their files, never loaded whole), to a temporary ``.data`` beside it
    (4 KiB-aligned, so onnxruntime can map them); check; then rename both into place."""
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    data_name = f"{name}.data"
    tmp_data = tmp + ".data"  # no ".." in a location: the checker refuses it
    try:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        with open(tmp_data, "wb") as f:
            write_external(out, f, os.path.basename(tmp_data))
        onnx.save_model(out, tmp)
        # The written file passes the checker (structure, full shape inference, external data present and
        # long enough); the run check uses the in-memory model, whose weights are the same bytes (mapped
        # from the input's file when they come from there), so no session loads a second copy of them.
        _check(tmp, None, threads, checker)
        if check_feed is not None:
            sess = make_session(model, level="basic", threads=threads)
            sess.run(None, {i.name: check_feed[i.name] for i in sess.get_inputs()})
        relocate(out, data_name)
        onnx.save_model(out, tmp)
        os.replace(tmp_data, os.path.join(folder, data_name))
        os.replace(tmp, path)
    except BaseException:
        for f in (tmp, tmp_data):
            if os.path.exists(f):
                os.remove(f)
        raise
    return path
