"""Removing decoder layers together with their KV cache (see ``decoder.py`` for how layers are found).

The interface changes, on purpose and only this way: the removed layers' cache inputs
(``past_key_values.i.*``) and outputs (``present.i.*``) are dropped and the remaining ones renumbered
0..n-1 in stack order, so the model stays loadable by runtimes that enumerate caches by number
(onnxruntime-genai's ``past_key_values.%d.key``). Every other input and output keeps its name, dtype and
shape.

* plain form (Add + norm): the consumers of a removed layer's exit read its entry (``surgery.rewire``).
* fused form (``Skip*LayerNormalization``): layer i is opened by a norm ``P`` (the previous layer's closing
  Skip-norm, or the embeddings' norm) and closed by a Skip-norm ``N`` that adds the layer's last branch and
  applies the next layer's input norm (or the final norm). Removing it: ``P`` takes ``N``'s gamma (and beta,
  epsilon), so the next layer reads norm_{i+1}(stream before layer i); readers of ``N``'s normalised output
  read ``P``'s, readers of ``N``'s sum (output 3) read ``P``'s sum (or the embeddings when ``P`` is the first
  norm). The layer's residual contribution disappears; the following norm keeps its weight.
* a removed layer's cache input read elsewhere by shape only (the causal mask reads
  ``Shape(past_key_values.0.key)``) is replaced there by the first kept layer's input of the same kind.

``update_configs`` rewrites ``genai_config.json`` and ``config.json`` beside the model;
``prune_folder`` does model + configs + copies of the other files of an export folder.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from ..errors import InputError, TargetError
from .blocks import Block
from .decoder import FUSED, SKIP_NORMS, DecoderLayer, DecoderReport, find_decoder_layers
from .ir import from_gs, node_key, to_gs
from .surgery import rewire
from .weights import all_tensors

log = logging.getLogger(__name__)


def remove_layers(model: onnx.ModelProto, layers: Iterable[int | DecoderLayer | Block], *,
                  report: DecoderReport | None = None) -> onnx.ModelProto:
    """A copy of ``model`` without the decoder ``layers`` and their caches. A layer is given by its cache
    number, its DecoderLayer, or its Block (``report.blocks``, matched by id, for callers that hold Blocks).

    report: ``find_decoder_layers(model)`` when already computed. Raises TargetError when every layer would
    go, InputError for an unknown layer number. The input model is not modified.
    """
    report = report or find_decoder_layers(model)
    by_index, by_id = report.by_index(), report.by_id()
    chosen = set()
    for x in layers:
        if isinstance(x, Block):
            if x.id not in by_id:
                raise InputError(f"block {x.id} is not a decoder layer of this model")
            chosen.add(by_id[x.id].index)
        else:
            chosen.add(x.index if isinstance(x, DecoderLayer) else int(x))
    chosen = sorted(chosen)
    for i in chosen:
        if i not in by_index:
            raise InputError(f"no decoder layer {i}: the model has layers 0..{len(by_index) - 1}")
    if not chosen:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out
    kept = [i for i in sorted(by_index) if i not in chosen]
    if not kept:
        raise TargetError("cannot remove every decoder layer")
    graph = to_gs(model, infer=False)
    removed = [by_index[i] for i in chosen]
    if report.form == FUSED:
        _bypass_fused(graph, removed)
    else:
        rewire(graph, [layer.block for layer in removed])
    _drop_caches(graph, report, chosen, kept)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = from_gs(graph, like=model)
    _restore_declarations(out, model, report, kept)
    return out


def _bypass_fused(graph: gs.Graph, removed: Sequence[DecoderLayer]) -> None:
    """Fused form: give each removed layer's opening norm the closing Skip-norm's parameters and point the
    closing norm's readers at the opening norm's outputs (in stack order, so runs of removed layers chain)."""
    nodes = {node_key(n): n for n in graph.nodes}
    took_over: dict[str, gs.Node] = {}  # key of a bypassed closing norm -> node now doing its job
    for layer in sorted(removed, key=lambda x: x.index):
        p = took_over.get(layer.norm_in) or nodes.get(layer.norm_in)
        n = nodes.get(layer.norm_out)
        if p is None or n is None or n.op not in SKIP_NORMS:
            raise InputError(f"decoder layer {layer.index}: its fused norms were not found")
        # parameters: gamma (input 2 of a Skip-norm, 1 of a norm), beta after it where the op has one
        first = 2 if p.op in SKIP_NORMS else 1
        params = list(n.inputs[2:3])
        if p.op in ("LayerNormalization", "SkipLayerNormalization") and len(n.inputs) > 3:
            params.append(n.inputs[3])
        kept_inputs = list(p.inputs[:first]) + params
        p.inputs.clear()
        p.inputs.extend(kept_inputs)
        if "epsilon" in n.attrs:
            p.attrs["epsilon"] = n.attrs["epsilon"]
        if p.op in SKIP_NORMS:
            stream = p.outputs[3] if len(p.outputs) > 3 and p.outputs[3].name else None
        else:
            stream = p.inputs[0]  # the embeddings' norm: the stream is its input
        _replace_uses(graph, n.outputs[0], p.outputs[0])
        n_sum = n.outputs[3] if len(n.outputs) > 3 and n.outputs[3].name else None
        if n_sum is not None and (n_sum.outputs or n_sum in graph.outputs):
            if stream is None:
                raise InputError(f"decoder layer {layer.index}: no residual sum to hand on")
            _replace_uses(graph, n_sum, stream)
        took_over[layer.norm_out] = p


def _replace_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Every reader of ``old`` reads ``new``; a graph output ``old`` becomes Identity(new) under its name."""
    for consumer in list(old.outputs):
        for k, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[k] = new
    if old in graph.outputs:
        old.inputs.clear()
        graph.nodes.append(gs.Node("Identity", name=f"{old.name}/bypass", inputs=[new], outputs=[old]))


def _drop_caches(graph: gs.Graph, report: DecoderReport, chosen: list[int], kept: list[int]) -> None:
    """Remove the chosen layers' cache inputs/outputs and renumber the kept ones 0..len(kept)-1."""
    tensors = graph.tensors()
    cache = report.cache
    first_kept = cache.past(kept[0])
    for i in chosen:
        for k, name in enumerate(cache.past(i)):
            t = tensors[name]
            for consumer in list(t.outputs):  # shape readers shared by all layers (the causal mask)
                for j, x in enumerate(consumer.inputs):
                    if x is t:
                        consumer.inputs[j] = tensors[first_kept[k]]
    drop_in = {n for i in chosen for n in cache.past(i)}
    drop_out = {n for i in chosen for n in cache.present(i)}
    graph.inputs = [t for t in graph.inputs if t.name not in drop_in]
    graph.outputs = [t for t in graph.outputs if t.name not in drop_out]
    for name in drop_in | drop_out:  # dead until cleanup; their names go to renumbered tensors
        tensors[name].name = f"{name}/removed"
    renames = {}
    for new, old in enumerate(kept):
        renames.update(zip(cache.past(old), cache.past(new)))
        renames.update(zip(cache.present(old), cache.present(new)))
    renames = {a: b for a, b in renames.items() if a != b}
    for a in renames:  # two phases: a kept name may be another kept tensor's old name
        tensors[a].name = f"{a}/renumber"
    for a, b in renames.items():
        tensors[a].name = b


def _restore_declarations(out: onnx.ModelProto, model: onnx.ModelProto, report: DecoderReport,
                          kept: list[int]) -> None:
    """The original input/output declarations (dtypes, symbolic shapes), renamed for renumbered caches."""
    cache = report.cache
    back = {}
    for new, old in enumerate(kept):
        back.update(zip(cache.past(new), cache.past(old)))
        back.update(zip(cache.present(new), cache.present(old)))
    for fld in ("input", "output"):
        original = {v.name: v for v in getattr(model.graph, fld)}
        for v in getattr(out.graph, fld):
            src = original.get(back.get(v.name, v.name))
            if src is not None:
                name = v.name
                v.CopyFrom(src)
                v.name = name


def expected_interface(model: onnx.ModelProto, report: DecoderReport, layers: Iterable[int]) -> tuple[list, list]:
    """(input names, output names) the pruned model must have: the original's minus the removed caches,
    renumbered."""
    chosen = set(layers)
    n = report.cache.n_layers
    kept = [i for i in range(n) if i not in chosen]
    pasts = {p for i in range(n) for p in report.cache.past(i)}
    presents = {p for i in range(n) for p in report.cache.present(i)}
    ins = [v.name for v in model.graph.input if v.name not in pasts]
    outs = [v.name for v in model.graph.output if v.name not in presents]
    ins += [p for j in range(len(kept)) for p in report.cache.past(j)]
    outs += [p for j in range(len(kept)) for p in report.cache.present(j)]
    return ins, outs


# ---------------------------------------------------------------- configs and folders

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def update_configs(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, kept: Sequence[int],
                   n_layers: int, *, follow_symlinks: bool = False) -> list[str]:
    """Write ``genai_config.json`` / ``config.json`` of ``src_dir`` into ``dst_dir`` for a model keeping
    layers ``kept`` (original numbers) of ``n_layers``: layer counts become ``len(kept)``, per-layer lists
    (``layer_types``, any list of length ``n_layers`` under a key naming layers) keep the kept entries,
    ``max_window_layers`` (Qwen2: layers below it use full attention) counts the kept layers below it.
    Returns the files written. Each is read from a regular file inside ``src_dir`` (``_side_file``) and written
    through a temporary file and renamed (``io.write_text_atomic``)."""
    from ..io import write_text_atomic

    written = []
    for name in ("genai_config.json", "config.json"):
        if not os.path.lexists(os.path.join(src_dir, name)):
            continue
        with open(_side_file(src_dir, name, follow_symlinks), encoding="utf-8") as f:
            cfg = json.load(f)
        _update(cfg, kept, n_layers)
        dst = os.path.join(dst_dir, name)
        write_text_atomic(dst, json.dumps(cfg, indent=4) + "\n")
        written.append(dst)
    return written


def _side_file(folder: str | os.PathLike, name: str, follow_symlinks: bool = False) -> str:
    """The real path of file ``name`` of export folder ``folder``: a regular file inside it (UnsafePathError
    otherwise; a symbolic link out of it only with ``follow_symlinks``)."""
    from ..paths import confined_file

    return confined_file(folder, name, what=f"{name} of the export folder {folder}", follow_symlinks=follow_symlinks,
                         hint="pass --follow-symlinks to read it")


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


def decoder_filename(folder: str | os.PathLike, *, follow_symlinks: bool = False) -> str:
    """The model file name of an export folder: genai_config.json's decoder filename, else model.onnx (a name,
    checked to be inside the folder where it is opened)."""
    if os.path.lexists(os.path.join(os.fspath(folder), "genai_config.json")):
        with open(_side_file(folder, "genai_config.json", follow_symlinks), encoding="utf-8") as f:
            name = json.load(f).get("model", {}).get("decoder", {}).get("filename", "model.onnx")
        if not isinstance(name, str):
            raise InputError(f"genai_config.json of {folder}: the decoder filename is not a string")
        return name
    return "model.onnx"


def prune_folder(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, layers: Iterable[int], *,
                 model_name: str | None = None, check: bool = True, pruned: onnx.ModelProto | None = None,
                 report: DecoderReport | None = None, external: bool | None = None,
                 follow_symlinks: bool = False) -> DecoderReport:
    """Remove decoder ``layers`` from the export folder ``src_dir`` (optimum or onnxruntime-genai) into the
    new folder ``dst_dir``: the model (weights as external data ``<model>.data`` when the input had external
    data, streamed from the input's file without loading it whole), the updated configs, and every other file
    copied (tokenizer, generation config).

    The folder is written under a temporary name beside ``dst_dir`` and renamed into place when complete;
    ``dst_dir`` must not exist (or be empty). model_name: the ONNX file (default: genai_config's decoder
    filename, else ``model.onnx``). check: the pruned model must load and run once in onnxruntime (prefill,
    zero-length past) before the rename. ``onnx.checker`` is not run: onnxruntime-genai exports use
    onnxruntime's own operators in the default domain (SimplifiedLayerNormalization), which it refuses.
    pruned: the model to write when already computed (``remove_layers`` of the input with ``layers``,
    possibly fine-tuned since); its weights may be in memory or external. report / external: the input's
    ``find_decoder_layers`` and whether it keeps external data, when the caller has them (with ``pruned``, the
    input model is then not read again). Returns the report of the input model's layers. Every file read from
    ``src_dir`` must be a regular file inside it (``_side_file``; a symbolic link out of it only with
    ``follow_symlinks``), and the new folder gets the mode ``mkdir`` gives.
    """
    import tempfile

    from .weights import write_external
    from .decoder import dummy_feed
    from .ir import load_model_and_layout

    src_dir, dst_dir = os.path.abspath(os.fspath(src_dir)), os.path.abspath(os.fspath(dst_dir))
    if src_dir == dst_dir:
        raise InputError("output folder is the input folder; the input is never overwritten")
    if os.path.exists(dst_dir) and (not os.path.isdir(dst_dir) or os.listdir(dst_dir)):
        raise InputError(f"output folder exists and is not empty: {dst_dir}")
    if not os.path.isdir(os.path.dirname(dst_dir)):
        raise InputError(f"output's parent folder does not exist: {os.path.dirname(dst_dir)}")
    if model_name is None:
        model_name = decoder_filename(src_dir, follow_symlinks=follow_symlinks)
    if not os.path.lexists(os.path.join(src_dir, model_name)):
        raise InputError(f"no model {model_name} in {src_dir}")
    _side_file(src_dir, model_name, follow_symlinks)
    src_model = os.path.normpath(os.path.join(src_dir, model_name))
    data_files = set() if external is False else _external_files(src_model)  # False: an inline input, not parsed
    if pruned is not None and report is not None and external is not None:
        model = None  # the caller has what the input would give: an inline input is not parsed again
    else:
        model, external = load_model_and_layout(src_model)  # external weights stay in their file, mapped on use
        report = find_decoder_layers(model)
    chosen = sorted(set(layers))
    own = pruned is None or external or any(_is_external(t) for t in all_tensors(pruned))
    if pruned is None:
        out = remove_layers(model, chosen, report=report)
    elif own:  # a copy: writing moves its tensors' bytes (and locations) into the new data file
        out = onnx.ModelProto()
        out.CopyFrom(pruned)
    else:  # inline weights, written as they are: no copy
        out = pruned
    external = external or any(_is_external(t) for t in all_tensors(out))
    kept = [i for i in range(report.cache.n_layers) if i not in chosen]
    from ..io import default_mode

    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst_dir)}.", dir=os.path.dirname(dst_dir))
    try:
        os.chmod(tmp, default_mode(0o777))  # mkdtemp's 0700 would survive the rename
        _copy_side_files(src_dir, tmp, {model_name, "genai_config.json", "config.json"} | data_files,
                         follow_symlinks)
        path = os.path.join(tmp, model_name)
        if external:  # weights streamed tensor by tensor from the input's data file (4 KiB aligned)
            with open(os.path.join(tmp, f"{model_name}.data"), "wb") as f:
                for t in all_tensors(out):
                    _inline_if_small(t)
                write_external(out, f, f"{model_name}.data")
                empty = f.tell() == 0
            if empty:
                os.remove(os.path.join(tmp, f"{model_name}.data"))
        onnx.save_model(out, path)
        if check:
            import onnxruntime as ort

            from .weights import release_mapped_pages

            feed = dummy_feed(out, seq=3)
            if own:
                del out.graph.initializer[:]  # written: the check session holds its own copy
            release_mapped_pages()  # the input's weights, read for the copy: not resident beside the output's

            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            # no graph optimisation, no prepacking: both copy the weights (2x the output's at 1B parameters)
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            so.add_session_config_entry("session.disable_prepacking", "1")
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            sess.run(None, feed)
        update_configs(src_dir, tmp, kept, report.cache.n_layers, follow_symlinks=follow_symlinks)
        if os.path.isdir(dst_dir):
            os.rmdir(dst_dir)
        os.rename(tmp, dst_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("removed decoder layers %s of %d (%s form) into %s", chosen, report.cache.n_layers, report.form,
             dst_dir)
    return report


def _copy_side_files(src_dir: str, dst_dir: str, skip: set[str], follow_symlinks: bool) -> None:
    """Copy the files of ``src_dir`` not in ``skip`` (tokenizer, generation config, ...) into ``dst_dir``; each
    must be a regular file inside ``src_dir`` (``_side_file``). Folders are not copied."""
    for name in os.listdir(src_dir):
        if name not in skip and not os.path.isdir(os.path.join(src_dir, name)):
            shutil.copyfile(_side_file(src_dir, name, follow_symlinks), os.path.join(dst_dir, name))


def _inline_if_small(t: onnx.TensorProto, min_bytes: int = 1024) -> None:
    """Bring a small external tensor inline: onnxruntime reads shape inputs (Unsqueeze axes, Reshape
    shapes) only from inline data."""
    from .weights import external_array, is_external

    if is_external(t):
        arr = external_array(t)
        if arr.nbytes < min_bytes:
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), t.name))


def _is_external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def _external_files(path: str) -> set[str]:
    """Names of the external data files ``path``'s initializers point to (relative to its folder)."""
    m = onnx.load(path, load_external_data=False)
    return {e.value for t in all_tensors(m) for e in t.external_data if e.key == "location"}
