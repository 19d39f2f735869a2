"""Export folders of decoder LLMs (optimum, onnxruntime-genai, any registered format): which file is the
model, the configs that count layers, and writing a pruned folder.

A folder *format* is a ``FolderFormat`` registered with ``register_folder_format`` (the built-in ones in
``folder_formats.py``): its config files, how to rewrite them for the kept layers, the model file they name
and how to detect the format. ``decoder_filename`` names the model file of a folder; ``update_configs``
rewrites the configs of the folder's formats (``detect_formats``) for the kept layers; ``prune_folder`` writes
model + configs + copies of the folder's other files (tokenizer, generation config) into a new folder,
atomically (``io.atomic_folder``). Every file read from an export folder must be a regular file inside it
(``paths.confined_file``; a symbolic link out of it only with ``follow_symlinks``). The layer surgery itself is
``graph.kv_surgery``'s.
"""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import InputError
from ..graph.decoder import DecoderReport, dummy_feed, find_decoder_layers
from ..graph.ir import load_model_and_layout
from ..graph.kv_surgery import remove_layers
from ..graph.weights import (all_tensors, external_array, is_external, release_mapped_pages, write_external,
                              write_inline)
from ..io import atomic_folder, write_text_atomic
from ..paths import confined_file

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "model.onnx"
"""The model file of a folder whose formats name none."""


@dataclass(frozen=True)
class FolderFormat:
    """An export-folder format (``register_folder_format``).

    config_files: names of the files of the folder that count layers; read (each a regular file inside the
    folder, ``side_file``) and rewritten for the kept layers when a folder is pruned, never copied as they are.
    rewrite: ``(name, text, kept, n_layers) -> str``, the new contents of config file ``name`` (``text``: its
    contents) for a model keeping layers ``kept`` (original numbers, ascending) of ``n_layers``.
    model_name: ``(folder, read) -> str | None``, the model file name the folder's configs give (None: they name
    none); ``read(name)`` returns the text of a config file, confined to the folder. detect: ``folder -> bool``,
    the folder is in this format (default: one of ``config_files`` is in it)."""
    name: str
    config_files: tuple[str, ...]
    rewrite: Callable[[str, str, Sequence[int], int], str]
    model_name: Callable[[str, Callable[[str], str]], str | None] | None = None
    detect: Callable[[str], bool] | None = None

    def detected(self, folder: str) -> bool:
        """Whether ``folder`` is in this format."""
        if self.detect is not None:
            return bool(self.detect(folder))
        return any(os.path.lexists(os.path.join(folder, n)) for n in self.config_files)


FOLDER_FORMATS: dict[str, FolderFormat] = {}
"""Format name -> FolderFormat, in registration order (the built-in ones, ``folder_formats.py``, first)."""


def register_folder_format(fmt: FolderFormat) -> FolderFormat:
    """Add an export-folder format (a name registered twice raises). Returns ``fmt``."""
    if fmt.name in FOLDER_FORMATS:
        raise ValueError(f"export-folder format {fmt.name!r} registered twice")
    FOLDER_FORMATS[fmt.name] = fmt
    return fmt


def detect_formats(folder: str | os.PathLike) -> list[FolderFormat]:
    """The registered formats ``folder`` is in, in registration order (none: a folder with a model file only)."""
    from . import folder_formats  # noqa: F401  (registers the built-in formats)

    folder = os.fspath(folder)
    return [f for f in FOLDER_FORMATS.values() if f.detected(folder)]


def update_configs(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, kept: Sequence[int],
                   n_layers: int, *, follow_symlinks: bool = False) -> list[str]:
    """Write the config files of ``src_dir``'s formats (``detect_formats``: ``genai_config.json``,
    ``config.json``, ...) into ``dst_dir`` for a model keeping layers ``kept`` (original numbers) of
    ``n_layers``, each rewritten by its format (``FolderFormat.rewrite``). Returns the files written. Each is
    read from a regular file inside ``src_dir`` (``side_file``) and written through a temporary file and renamed
    (``io.write_text_atomic``)."""
    written = []
    for fmt in detect_formats(src_dir):
        for name in fmt.config_files:
            dst = os.path.join(dst_dir, name)
            if not os.path.lexists(os.path.join(src_dir, name)) or dst in written:
                continue
            with open(side_file(src_dir, name, follow_symlinks), encoding="utf-8") as f:
                text = f.read()
            write_text_atomic(dst, fmt.rewrite(name, text, kept, n_layers))
            written.append(dst)
    return written


def side_file(folder: str | os.PathLike, name: str, follow_symlinks: bool = False) -> str:
    """The real path of file ``name`` of export folder ``folder``: a regular file inside it (UnsafePathError
    otherwise; a symbolic link out of it only with ``follow_symlinks``)."""
    return confined_file(folder, name, what=f"{name} of the export folder {folder}", follow_symlinks=follow_symlinks,
                         hint="pass --follow-symlinks to read it")


def decoder_filename(folder: str | os.PathLike, *, follow_symlinks: bool = False) -> str:
    """The model file name of an export folder: the first its formats name (``detect_formats``; genai:
    genai_config.json's decoder filename), else ``DEFAULT_MODEL_NAME`` (a name, checked to be inside the folder
    where it is opened)."""
    folder = os.fspath(folder)

    def read(name: str) -> str:
        with open(side_file(folder, name, follow_symlinks), encoding="utf-8") as f:
            return f.read()

    for fmt in detect_formats(folder):
        name = fmt.model_name(folder, read) if fmt.model_name is not None else None
        if name is not None:
            return name
    return DEFAULT_MODEL_NAME


def prune_folder(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, layers: Iterable[int], *,
                 model_name: str | None = None, check: bool = True, pruned: onnx.ModelProto | None = None,
                 report: DecoderReport | None = None, external: bool | None = None,
                 follow_symlinks: bool = False) -> DecoderReport:
    """Remove decoder ``layers`` from the export folder ``src_dir`` (optimum or onnxruntime-genai) into the
    new folder ``dst_dir``: the model (weights as external data ``<model>.data`` when the input had external
    data, streamed from the input's file without loading it whole), the updated configs, and every other file
    copied (tokenizer, generation config).

    The folder is written under a temporary name beside ``dst_dir`` and renamed into place when complete
    (``io.atomic_folder``); ``dst_dir`` must not exist (or be empty). model_name: the ONNX file (default:
    ``decoder_filename``: genai_config's, else ``model.onnx``). check: the pruned model must load and run once in
    onnxruntime (prefill, zero-length past; on the run's providers, ``runtime.make_session``) before the rename.
    ``onnx.checker`` is not run: onnxruntime-genai exports use onnxruntime's own operators in the default domain
    (SimplifiedLayerNormalization), which it refuses. pruned: the model to write when already computed
    (``remove_layers`` of the input with ``layers``, possibly fine-tuned since); its weights may be in memory or
    external. report / external: the input's ``find_decoder_layers`` and whether it keeps external data, when the
    caller has them (with ``pruned``, the input model is then not read again). Returns the report of the input
    model's layers. Every file read from ``src_dir`` must be a regular file inside it (``side_file``; a
    symbolic link out of it only with ``follow_symlinks``), and the new folder gets the mode ``mkdir`` gives.
    """
    src_dir, dst_dir = _check_folders(src_dir, dst_dir)
    if model_name is None:
        model_name = decoder_filename(src_dir, follow_symlinks=follow_symlinks)
    if not os.path.lexists(os.path.join(src_dir, model_name)):
        raise InputError(f"no model {model_name} in {src_dir}")
    side_file(src_dir, model_name, follow_symlinks)
    src_model = os.path.normpath(os.path.join(src_dir, model_name))
    data_files = set() if external is False else _external_files(src_model)  # False: an inline input, not parsed
    if pruned is not None and report is not None and external is not None:
        model = None  # the caller has what the input would give: an inline input is not parsed again
    else:
        model, external = load_model_and_layout(src_model)  # external weights stay in their file, mapped on use
        report = find_decoder_layers(model)
    chosen = sorted(set(layers))
    own = pruned is None or external or any(is_external(t) for t in all_tensors(pruned))
    if pruned is None:
        out = remove_layers(model, chosen, report=report)
    elif own:  # a copy: writing moves its tensors' bytes (and locations) into the new data file
        out = onnx.ModelProto()
        out.CopyFrom(pruned)
    else:  # inline weights, written as they are: no copy
        out = pruned
    external = external or any(is_external(t) for t in all_tensors(out))
    kept = [i for i in range(report.cache.n_layers) if i not in chosen]
    with atomic_folder(dst_dir) as tmp:
        configs = {n for fmt in detect_formats(src_dir) for n in fmt.config_files}
        _copy_side_files(src_dir, tmp, {model_name} | configs | data_files, follow_symlinks)
        _write_model(out, tmp, model_name, external=external, check=check, own=own)
        update_configs(src_dir, tmp, kept, report.cache.n_layers, follow_symlinks=follow_symlinks)
    log.info("removed decoder layers %s of %d (%s form) into %s", chosen, report.cache.n_layers, report.form,
             dst_dir)
    return report


def _check_folders(src_dir, dst_dir) -> tuple[str, str]:
    """(src_dir, dst_dir) as absolute paths; InputError when the output is the input, a non-empty folder or a
    file, or its parent folder is missing."""
    src_dir, dst_dir = os.path.abspath(os.fspath(src_dir)), os.path.abspath(os.fspath(dst_dir))
    if src_dir == dst_dir:
        raise InputError("output folder is the input folder; the input is never overwritten")
    if os.path.exists(dst_dir) and (not os.path.isdir(dst_dir) or os.listdir(dst_dir)):
        raise InputError(f"output folder exists and is not empty: {dst_dir}")
    if not os.path.isdir(os.path.dirname(dst_dir)):
        raise InputError(f"output's parent folder does not exist: {os.path.dirname(dst_dir)}")
    return src_dir, dst_dir


def _write_model(out: onnx.ModelProto, folder: str, model_name: str, *, external: bool, check: bool,
                 own: bool) -> None:
    """Write ``out`` as ``folder/model_name`` (its weights streamed tensor by tensor into ``<model_name>.data``,
    4 KiB aligned, when ``external``); with ``check``, run it once (prefill) in onnxruntime. ``own``: ``out`` is
    this function's copy, whose weights may be dropped once written."""
    from ..runtime import SHARED_ARENA, make_session  # onnxruntime only when a check runs

    path = os.path.join(folder, model_name)
    if external:  # weights streamed tensor by tensor from the input's data file (4 KiB aligned)
        with open(os.path.join(folder, f"{model_name}.data"), "wb") as f:
            for t in all_tensors(out):
                _inline_if_small(t)
            write_external(out, f, f"{model_name}.data")
            empty = f.tell() == 0
        if empty:
            os.remove(os.path.join(folder, f"{model_name}.data"))
    if external:
        onnx.save_model(out, path)
    else:  # inline, as the input was: tensors spilled for the run (``llm.spill``) streamed back one at a time
        with open(path, "wb") as f:
            write_inline(out, f)
    if check:
        feed = dummy_feed(out, seq=3)
        if own:
            del out.graph.initializer[:]  # written: the check session holds its own copy
        release_mapped_pages()  # the input's weights, read for the copy: not resident beside the output's
        # no graph optimisation, no prepacking: both copy the weights (2x the output's at 1B parameters)
        make_session(path, level="disable", threads=1, prepack=False, arena=SHARED_ARENA).run(None, feed)


def _copy_side_files(src_dir: str, dst_dir: str, skip: set[str], follow_symlinks: bool) -> None:
    """Copy the files of ``src_dir`` not in ``skip`` (tokenizer, generation config, ...) into ``dst_dir``; each
    must be a regular file inside ``src_dir`` (``side_file``). Folders are not copied."""
    for name in os.listdir(src_dir):
        if name not in skip and not os.path.isdir(os.path.join(src_dir, name)):
            shutil.copyfile(side_file(src_dir, name, follow_symlinks), os.path.join(dst_dir, name))


def _inline_if_small(t: onnx.TensorProto, min_bytes: int = 1024) -> None:
    """Bring a small external tensor inline: onnxruntime reads shape inputs (Unsqueeze axes, Reshape
    shapes) only from inline data."""
    if is_external(t):
        arr = external_array(t)
        if arr.nbytes < min_bytes:
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), t.name))


def _external_files(path: str) -> set[str]:
    """Names of the external data files ``path``'s initializers point to (relative to its folder)."""
    m = onnx.load(path, load_external_data=False)
    return {e.value for t in all_tensors(m) for e in t.external_data if e.key == "location"}


def model_file(path: str | os.PathLike, *, follow_symlinks: bool = False) -> str:
    """The ONNX file of an export folder (genai_config's decoder filename, else model.onnx: a regular file inside
    the folder, ``paths.confined_file``), or ``path``."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise InputError(f"model not found: {path}")
        return path
    name = decoder_filename(path, follow_symlinks=follow_symlinks)
    if not os.path.lexists(os.path.join(path, name)):
        raise InputError(f"no {name} in the folder {path}")
    confined_file(path, name, what="the decoder model of the export folder", follow_symlinks=follow_symlinks,
                  hint="pass --follow-symlinks to read it")
    return os.path.normpath(os.path.join(path, name))  # its external data is beside it, as onnx looks for it
