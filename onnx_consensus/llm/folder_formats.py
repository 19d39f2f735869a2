"""The export-folder formats the package knows, registered with ``folder.register_folder_format``: the
onnxruntime-genai model builder's (``genai_config.json``, which names the decoder file) and optimum's
(``config.json``, a Hugging Face model config). Both configs are JSON whose layer counts and per-layer lists
``rewrite_json_layers`` rewrites for the kept layers. A new format is one module like this one.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

from ..errors import InputError, UnsafePathError
from .folder import FolderFormat, register_folder_format, side_file

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def rewrite_json_layers(name: str, text: str, kept: Sequence[int], n_layers: int) -> str:
    """The JSON config ``text`` (file ``name``) for a model keeping layers ``kept`` (original numbers) of
    ``n_layers``: layer counts (``LAYER_COUNT_KEYS`` equal to ``n_layers``) become ``len(kept)``, per-layer
    lists (``layer_types``, any list of length ``n_layers`` under a key naming layers) keep the kept entries,
    ``max_window_layers`` (Qwen2: layers below it use full attention) counts the kept layers below it. Written
    with an indent of 4 and a final newline."""
    cfg = json.loads(text)
    _update(cfg, kept, n_layers)
    return json.dumps(cfg, indent=4) + "\n"


def _update(obj, kept: Sequence[int], n_layers: int) -> None:
    if isinstance(obj, dict):
        for k, v in list(obj.items()):
            if k in LAYER_COUNT_KEYS and v == n_layers:
                obj[k] = len(kept)
            elif k == "max_window_layers" and isinstance(v, int):
                obj[k] = sum(1 for i in kept if i < v)
            elif isinstance(v, list) and len(v) == n_layers and "layer" in k.lower():
                obj[k] = [v[i] for i in kept]
            else:
                _update(v, kept, n_layers)
    elif isinstance(obj, list):
        for v in obj:
            _update(v, kept, n_layers)


def genai_model_name(folder: str, read: Callable[[str], str]) -> str:
    """genai_config.json's decoder filename (``model.decoder.filename``; ``model.onnx`` when absent)."""
    name = json.loads(read("genai_config.json")).get("model", {}).get("decoder", {}).get("filename", "model.onnx")
    if not isinstance(name, str):
        raise InputError(f"genai_config.json of {folder}: the decoder filename is not a string")
    return name


def genai_dims(folder: str | os.PathLike | None, *, follow_symlinks: bool = False) -> dict[str, int]:
    """``{"kv_heads": n, "head_size": d}`` from ``folder``/genai_config.json (the keys it has; {} without it, or
    when it is not a regular file inside the folder: ``folder.side_file``, a link out of it followed only with
    ``follow_symlinks``). The cache dims the graph leaves symbolic fall back to these
    (``graph.kv_dims.cache_dims``)."""
    if folder is None or not os.path.lexists(os.path.join(os.fspath(folder), "genai_config.json")):
        return {}
    try:
        with open(side_file(folder, "genai_config.json", follow_symlinks), encoding="utf-8") as f:
            dec = json.load(f)["model"]["decoder"]
    except (UnsafePathError, OSError, ValueError, KeyError, TypeError):
        return {}
    out = {"kv_heads": dec.get("num_key_value_heads"), "head_size": dec.get("head_size")}
    return {k: int(v) for k, v in out.items() if isinstance(v, int) and v > 0}


GENAI = register_folder_format(FolderFormat("genai", ("genai_config.json",), rewrite_json_layers,
                                            model_name=genai_model_name))
OPTIMUM = register_folder_format(FolderFormat("optimum", ("config.json",), rewrite_json_layers))
