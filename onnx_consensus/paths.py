"""Files named by untrusted content, confined to the folder they must stay in.

A model names its external-data files, an export folder holds its tokenizer and configs, a calibration folder
lists its samples: none of these may make the tool read outside that folder. ``confined_file`` is the one
check every such read goes through (``graph.weights`` for external data, ``llm`` for files beside a model,
``data.calibration`` for calibration folders): the name is relative, stays inside the folder once normalised,
does not resolve (through symbolic links) outside it unless the user allowed that (``follow_symlinks``), and
is a regular file (no device, FIFO or socket, which could block or never end).
"""
from __future__ import annotations

import os
import stat

from .errors import UnsafePathError


def inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or below it (both taken as given: resolve them first)."""
    return os.path.commonpath([path, folder]) == folder


def confined_file(folder: str | os.PathLike, name: str, *, what: str, follow_symlinks: bool = False,
                  hint: str = "") -> str:
    """The real path of file ``name`` (relative to ``folder``), or UnsafePathError (one line starting with
    ``what``, e.g. "external data of tensor 'w0'"): ``name`` absolute or escaping with ``..``; a symbolic link
    resolving outside the folder (allowed with ``follow_symlinks``); missing; not a regular file. ``hint`` is
    appended to the symlink message (the option that allows it)."""
    folder = os.path.realpath(os.fspath(folder))
    if not name or os.path.isabs(name) or (os.path.splitdrive(name)[0]):
        raise UnsafePathError(f"{what}: {name!r} is an absolute path; files named by a model or data folder "
                              "must be relative to it")
    joined = os.path.normpath(os.path.join(folder, name))
    if not inside(joined, folder):
        raise UnsafePathError(f"{what}: {name!r} points outside the folder {folder}")
    real = os.path.realpath(joined)
    if not follow_symlinks and not inside(real, folder):
        raise UnsafePathError(f"{what}: {name!r} is a symbolic link to {real}, outside the folder {folder}"
                              + (f"; {hint}" if hint else ""))
    try:
        st = os.stat(real)
    except OSError as exc:
        raise UnsafePathError(f"{what}: {name!r} not found in {folder} ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise UnsafePathError(f"{what}: {name!r} is {kind}")
    return real
