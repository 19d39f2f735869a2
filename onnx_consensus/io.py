"""Writing outputs safely: every file the tool writes (the model, its ``.data``, the report, a decoder
folder's configs) goes through a temporary file beside the target, created here and renamed into place.

Temporary files are created with O_CREAT | O_EXCL | O_NOFOLLOW under a random name (``create_temporary``), so
a symbolic link or file planted at a temporary name is never followed nor truncated, and with mode 0666 masked
by the user's umask, the mode an ordinary ``open()`` gives (``default_mode``): the rename keeps it. A target
that exists (a planted symbolic link included) is replaced by the rename, never written through, so a
previous output's files keep their bytes until the new ones are complete.

The model is only ever replaced by a complete model that passed ``onnx.checker`` with full shape inference and
ran one batch in onnxruntime. What a failure midway leaves behind:

* an exception, Ctrl-C, or SIGTERM under the CLI (which turns it into an exception): nothing, the
  temporaries are removed;
* SIGKILL (or a power cut), single-file output on Linux: nothing, the temporary file is anonymous
  (O_TMPFILE) until it is linked as ``.NAME.XXXXXXXX.tmp`` and renamed over the target in the next instant;
* SIGKILL, external-data output (``NAME`` + ``NAME.data``), or where O_TMPFILE is missing: the named
  temporaries ``.NAME.XXXXXXXX.tmp`` (and ``.tmp.data``) beside the target stay until removed by hand; the
  two final files are renamed one after the other, so a kill between those two renames leaves the new
  ``NAME.data`` beside the previous ``NAME`` (if there was one).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import BinaryIO

import numpy as np
import onnx

from .errors import InputError
from .graph.weights import is_external, relocate, stored_nbytes, write_external, write_inline

TWO_GB = 2**31 - 1
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def umask() -> int:
    """The process's umask (read from /proc on Linux, without changing it; elsewhere set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def default_mode(base: int = 0o666) -> int:
    """The mode ``open()`` (``base`` 0o666) or ``mkdir`` (0o777) gives a new file under the current umask."""
    return base & ~umask()


def create_temporary(folder: str, name: str, suffix: str = ".tmp") -> tuple[int, str]:
    """(fd open for writing, path) of a new file ``.NAME.XXXXXXXX<suffix>`` in ``folder``, created with O_EXCL
    and O_NOFOLLOW (never an existing file nor a planted symbolic link) and mode 0666 under the umask."""
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}{suffix}")
        try:
            return os.open(tmp, _CREATE, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {name} in {folder}")


@contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[tuple[BinaryIO, str]]:
    """``with atomic_file(path) as (f, tmp):`` write ``f`` (binary); on leaving the block it is flushed,
    synced and renamed over ``path``; on an exception or interrupt it is removed and ``path`` is untouched."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    fd, tmp = create_temporary(folder, name, suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[str]:
    """``with atomic_folder(path) as tmp:`` fill the new folder ``tmp`` (beside ``path``, with the mode ``mkdir``
    gives, not mkdtemp's 0700); on leaving the block it is renamed to ``path`` (an empty folder there is
    replaced); on an exception or interrupt it is removed with its contents and ``path`` is untouched."""
    path = os.path.abspath(os.fspath(path))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
    try:
        os.chmod(tmp, default_mode(0o777))  # mkdtemp's 0700 would survive the rename
        yield tmp
        if os.path.isdir(path):
            os.rmdir(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` through ``atomic_file``. Returns the path."""
    with atomic_file(path) as (f, _):
        f.write(data)
    return os.fspath(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` through ``atomic_file``. Returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj, *, default: Callable | None = None, indent: int = 2) -> str:
    """Write ``obj`` as JSON to ``path`` through ``atomic_file`` (``default`` as in ``json.dumps``)."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, default=default))


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


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
    inline_size = model.ByteSize() + sum(stored_nbytes(t) for t in model.graph.initializer if is_external(t))
    if external_data or inline_size > TWO_GB:
        return _save_external(model, path, check_feed, threads, checker)
    folder = os.path.dirname(path)
    fd = _anonymous_file(folder)
    if fd is None:
        return _save_named(model, path, check_feed, threads, checker)
    try:
        with os.fdopen(os.dup(fd), "wb") as f:
            write_inline(model, f)  # external tensors (weights mapped for the run) inline, one at a time
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
        return os.open(folder, os.O_TMPFILE | os.O_RDWR, 0o666)
    except OSError:
        return None


def _link_into_place(fd: int, path: str) -> None:
    """Give the anonymous file ``fd`` a new random temporary name beside ``path`` (linkat with
    AT_SYMLINK_FOLLOW on /proc/self/fd, which os.link does not do; linkat never overwrites nor follows an
    existing name) and rename it over ``path``."""
    import ctypes
    import errno

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, at_symlink_follow = -100, 0x400
    folder, name = os.path.split(path)
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        if not libc.linkat(at_fdcwd, f"/proc/self/fd/{fd}".encode(), at_fdcwd, os.fsencode(tmp), at_symlink_follow):
            break
        err = ctypes.get_errno()
        if err != errno.EEXIST:
            raise OSError(err, os.strerror(err), tmp)
    else:
        raise FileExistsError(f"no free temporary name for {name} in {folder}")
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _check(source: str, check_feed, threads, checker: bool = True) -> None:
    from .runtime import make_session  # here: graph modules use this module's writers, and never import runtime

    if checker:
        onnx.checker.check_model(source, full_check=True)
    if check_feed is not None:
        sess = make_session(source, level="basic", threads=threads)
        sess.run(None, {i.name: check_feed[i.name] for i in sess.get_inputs()})


def _save_named(model, path, check_feed, threads, checker: bool = True) -> str:
    with atomic_file(path) as (f, tmp):
        write_inline(model, f)
        f.flush()
        _check(tmp, check_feed, threads, checker)
    return path


def _save_external(model, path, check_feed, threads, checker: bool = True) -> str:
    """Write the proto to a temporary ``.onnx`` and its weights, streamed tensor by tensor (memory-mapped
    external tensors are copied from their files, never loaded whole), to a temporary ``.data`` beside it
    (4 KiB-aligned, so onnxruntime can map them); check; then rename both into place."""
    folder, name = os.path.split(path)
    data_name = f"{name}.data"
    fd, tmp = create_temporary(folder, name)
    tmp_data = None
    try:
        data_fd, tmp_data = create_temporary(folder, name, ".tmp.data")  # a plain name: a location has no ".."
        out = onnx.ModelProto()
        out.CopyFrom(model)
        with os.fdopen(data_fd, "wb") as f:
            write_external(out, f, os.path.basename(tmp_data))
            f.flush()
            os.fsync(f.fileno())
        _rewrite(fd, out)
        # The written file passes the checker (structure, full shape inference, external data present and
        # long enough); the run check uses the in-memory model, whose weights are the same bytes (mapped
        # from the input's file when they come from there), so no session loads a second copy of them.
        _check(tmp, None, threads, checker)
        if check_feed is not None:
            from .runtime import make_session

            sess = make_session(model, level="basic", threads=threads)
            sess.run(None, {i.name: check_feed[i.name] for i in sess.get_inputs()})
        relocate(out, data_name)
        _rewrite(fd, out)
        os.replace(tmp_data, os.path.join(folder, data_name))
        os.replace(tmp, path)
    except BaseException:
        for f in (tmp, tmp_data):
            if f is not None:
                _remove(f)
        raise
    finally:
        os.close(fd)
    return path


def _rewrite(fd: int, model: onnx.ModelProto) -> None:
    """Replace the contents of open file ``fd`` with ``model``'s serialisation, synced."""
    data = model.SerializeToString()
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)
