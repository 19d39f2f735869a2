"""Quantization of a (pruned) decoder LLM with a KV cache, one registry of formats, all from onnxruntime:

- ``int4``: weight-only 4-bit ``MatMulNBits`` (com.microsoft) for every MatMul over a constant weight, blocks
  of ``quantize.INT4_BLOCK`` (32) along K, symmetric: ``onnx_consensus.quantize``'s own int4, the format
  onnxruntime-genai's CPU builds use (``-p int4``).
- ``int8``: dynamic int8 (``onnxruntime.quantization.quantize_dynamic``) of the MatMul weights only: int8
  weights per output channel, activations quantized at run time (``DynamicQuantizeLinear`` +
  ``MatMulInteger``); no calibration text needed. The fused operators of genai exports (GroupQueryAttention,
  Skip-norms, RotaryEmbedding) stay float. Static QDQ (the block path's int8) is not used: activation ranges
  of a decoder vary with the token and the position, and onnxruntime's QDQ passes do not cover its fused
  attention.
- ``fp16``: float16 weights and arithmetic (``onnx_consensus.quantize``'s fp16), float32 inputs, outputs and
  KV caches kept.

The interface never changes (input and output names and dtypes, the KV caches, their dims), so an export
folder's ``genai_config.json`` stays valid: ``quantize_export`` writes the folder through
``llm.folder.prune_folder`` with no layer removed (configs copied as they are, the model checked by one
onnxruntime run). A model already quantized (MatMulNBits, QDQ, MatMulInteger...) is refused in one line.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import onnx

from ..errors import InputError
from ..graph.quant import quantized_ops
from ..graph.weights import all_tensors, inline_external, is_external
from ..quantize import quantize, quiet
from ..registering import registrar

__all__ = ["DECODER_FORMATS", "check_quantizable", "quantize_decoder", "quantize_export", "register_decoder_format"]

DECODER_FORMATS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {}
"""Format name (``--quantize``) -> ``fn(model) -> ModelProto`` (weights in memory, interface unchanged)."""


register_decoder_format = registrar(DECODER_FORMATS, "decoder quantization format")
"""Decorator: register a decoder quantization format under ``name`` (a name registered twice raises)."""


@register_decoder_format("int4")
def _int4(model: onnx.ModelProto) -> onnx.ModelProto:
    return quantize(model, "int4")


@register_decoder_format("fp16")
def _fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    return quantize(model, "fp16")


@register_decoder_format("int8")
def _int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """MatMul weights int8 per channel, activations quantized at run time (MatMulInteger)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="onnx-consensus-q8-") as d, quiet():
        src, out = os.path.join(d, "in.onnx"), os.path.join(d, "q.onnx")
        big = model.ByteSize() > (1 << 31) - (1 << 24)
        onnx.save_model(model, src, save_as_external_data=big, location="in.onnx.data")
        quantize_dynamic(src, out, op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, use_external_data_format=big,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # onnxruntime's ops in the
        # default domain (SimplifiedLayerNormalization) stop ONNX's type inference: their outputs are float
        q = onnx.load_model(out)  # external data (if any) read into memory before the folder goes
    q.producer_name, q.producer_version = model.producer_name, model.producer_version
    del q.metadata_props[:]
    q.metadata_props.extend(model.metadata_props)
    if not any(n.op_type == "MatMulInteger" for n in q.graph.node):
        raise InputError("--quantize int8 (decoders) quantizes MatMul weights and the model has no MatMul over a "
                         "constant weight")
    return q


def _interface(model: onnx.ModelProto) -> list[tuple[str, str, int]]:
    return [(kind, v.name, v.type.tensor_type.elem_type)
            for kind, vs in (("input", model.graph.input), ("output", model.graph.output)) for v in vs]


def check_quantizable(model: onnx.ModelProto, fmt: str) -> None:
    """InputError in one line when ``fmt`` is not a name of ``DECODER_FORMATS`` or ``model`` is already
    quantized (``graph.quant.quantized_ops``); a prune run checks it before any layer is scored."""
    if fmt not in DECODER_FORMATS:
        raise InputError(f"--quantize must be one of {', '.join(DECODER_FORMATS)} for decoder LLMs, got {fmt!r}")
    ops = quantized_ops(model)
    if ops:
        raise InputError(f"the model is already quantized ({', '.join(ops)}): --quantize {fmt} needs a float "
                         "decoder (quantize the float export, pruned)")


def quantize_decoder(model: onnx.ModelProto, fmt: str) -> onnx.ModelProto:
    """``model`` (a decoder with a KV cache, pruned or not; not modified) quantized to ``fmt`` (a name of
    ``DECODER_FORMATS``), its weights in memory. Raises InputError for an unknown format, a model already
    quantized, or a model the format cannot quantize; the result's inputs and outputs (names, dtypes) are
    those of ``model`` (checked)."""
    check_quantizable(model, fmt)
    if any(is_external(t) for t in all_tensors(model)):
        work = onnx.ModelProto()
        work.CopyFrom(model)
        for t in all_tensors(work):
            if is_external(t):
                inline_external(t)
        model = work
    try:
        out = DECODER_FORMATS[fmt](model)
    except InputError:
        raise
    except Exception as exc:  # onnxruntime's quantizers assert on graphs they do not handle: one line
        raise InputError(f"--quantize {fmt}: onnxruntime's quantizer failed on this decoder "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'})") from None
    if _interface(out) != _interface(model):
        raise InputError(f"--quantize {fmt} changed this decoder's interface (inputs/outputs): not written")
    return out


def quantize_export(src: str | os.PathLike, dst: str | os.PathLike, fmt: str, *,
                    follow_symlinks: bool = False) -> str:
    """Quantize the decoder at ``src`` (an export folder: genai or optimum; or a model file; never modified)
    into ``dst`` (a new folder: the quantized model, configs and tokenizer copied; or a model file, external
    data ``<name>.data`` when the input had it). Checked by one onnxruntime prefill run. Returns ``dst``."""
    from ..graph.decoder import dummy_feed, find_decoder_layers
    from ..graph.ir import load_model_and_layout
    from .folder import prune_folder
    from ..io import check_output_path, save_model_atomic
    from .folder import model_file

    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    path = model_file(src, follow_symlinks=follow_symlinks)
    model, external = load_model_and_layout(path)
    q = quantize_decoder(model, fmt)
    if os.path.isdir(src):
        prune_folder(src, dst, [], pruned=q, report=find_decoder_layers(model), external=external,
                     follow_symlinks=follow_symlinks)
        return dst
    if os.path.isdir(dst):
        raise InputError(f"output is a folder but the input is a model file: give a .onnx path ({dst})")
    check_output_path(dst, src)
    unknown = any(n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type) for n in q.graph.node)
    save_model_atomic(q, dst, dummy_feed(q, seq=3), external_data=external, checker=not unknown)
    return dst
