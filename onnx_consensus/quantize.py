"""Quantization after pruning (``--quantize int8|int4|fp16``), one registry of formats, all from onnxruntime:

- ``int8``: static QDQ quantization (``onnxruntime.quantization.quantize_static``) calibrated on the run's own
  calibration batches (MinMax), after ``quant_pre_process`` (shape inference and onnxruntime's basic
  optimisations); weights int8 per channel (models below opset 13 converted to it first), activations uint8 (onnxruntime's CPU default, U8S8). CNNs and
  transformers alike: every Conv, MatMul, Gemm, Add ... onnxruntime quantizes gets a QDQ pair.
- ``int4``: weight-only 4-bit quantization of MatMul weights into ``MatMulNBits`` (com.microsoft; symmetric,
  blocks of 32 along K) with ``onnxruntime.quantization.matmul_nbits_quantizer``: for transformer and LLM
  MatMuls. A model with no MatMul over a constant weight is refused (int8 is the format for CNNs).
- ``fp16``: float16 weights and arithmetic (``onnxruntime.transformers.float16``, installed with onnxruntime:
  no extra dependency), float32 inputs and outputs kept (``keep_io_types``), nodes re-sorted.

The output interface never changes: the same input and output names, dtypes and shapes (QDQ and MatMulNBits
keep float32 at the graph's edges). Quantization changes the arithmetic's precision, not its count: a
quantized model has the MACs of the float model it came from.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator

import numpy as np
import onnx
import onnx.version_converter

from .errors import InputError
from .registering import registrar

__all__ = ["FORMATS", "quantize", "register_format", "CALIBRATION_SAMPLES", "CALIBRATION_BATCH"]

CALIBRATION_SAMPLES = 128
"""int8: at most this many calibration samples (the scoring samples, in order) set the activation ranges."""
CALIBRATION_BATCH = 16
"""int8: samples per calibration batch (a model's fixed batch overrides it)."""
INT4_BLOCK = 32

FORMATS: dict[str, Callable] = {}
"""Format name (``--quantize``) -> ``fn(model, batches) -> ModelProto``; ``batches``: a callable returning an
iterator of feeds ({input name: array}) for calibration, or None."""


register_format = registrar(FORMATS, "quantization format")
"""Decorator: register a quantization format under ``name`` (a name registered twice raises)."""


def quantize(model: onnx.ModelProto, fmt: str, data=None, indices=None, *,
             batch_size: int = CALIBRATION_BATCH) -> onnx.ModelProto:
    """``model`` quantized to ``fmt`` (a name of ``FORMATS``); ``model`` is not modified.

    data / indices: CalibrationData and the sample indices that calibrate int8 (at most
    ``CALIBRATION_SAMPLES`` of them, in order); formats without calibration ignore them. Raises InputError
    for an unknown format, int8 without data, or a model the format cannot quantize."""
    if fmt not in FORMATS:
        raise InputError(f"--quantize must be one of {', '.join(FORMATS)}, got {fmt!r}")
    batches = None
    if data is not None:
        idx = np.arange(data.n_samples) if indices is None else np.asarray(indices)
        idx = idx[:CALIBRATION_SAMPLES]

        def batches() -> Iterator[dict[str, np.ndarray]]:
            return data.batches(batch_size, idx)
    with quiet():
        out = FORMATS[fmt](model, batches)
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out


@contextlib.contextmanager
def quiet():
    """onnxruntime.quantization logs every node it skips at INFO, and routine fallbacks as warnings on the root
    logger: hold its loggers at ERROR for the call."""
    names = ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization", "root")
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for lg, _ in saved:  # its warnings too (per-channel falling back to per-tensor on a LayerNorm weight)
        lg.setLevel(max(lg.level, logging.ERROR))
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a callable returning feed iterators."""

    def __init__(self, batches: Callable[[], Iterator[dict[str, np.ndarray]]]):
        self._it = iter(batches())

    def get_next(self):
        return next(self._it, None)


@register_format("int8")
def _int8(model: onnx.ModelProto, batches) -> onnx.ModelProto:
    """Static QDQ int8: quant_pre_process, then quantize_static (MinMax, per-channel weights)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, \
        quantize_static

    if batches is None:
        raise InputError("--quantize int8 needs calibration data (--calib)")

    class Reader(_Reader, CalibrationDataReader):
        pass

    model, per_channel = _per_channel_opset(model)
    with tempfile.TemporaryDirectory(prefix="onnx-consensus-q-") as d:
        src, pre, out = (os.path.join(d, n) for n in ("in.onnx", "pre.onnx", "q.onnx"))
        onnx.save_model(model, src)
        try:
            quant_pre_process(src, pre, skip_symbolic_shape=False)
        except Exception:  # symbolic shape inference refuses some graphs: ONNX's alone then
            quant_pre_process(src, pre, skip_symbolic_shape=True)
        quantize_static(pre, out, Reader(batches), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return onnx.load_model(out)


PER_CHANNEL_OPSET = 13
"""Per-channel QDQ needs DequantizeLinear's ``axis``, which the default domain has from opset 13."""


def _per_channel_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """(``model`` at an opset that allows per-channel QDQ, whether it does): an older opset is converted to
    ``PER_CHANNEL_OPSET`` (onnx.version_converter); where that fails, the model as it is, per-tensor."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), PER_CHANNEL_OPSET)
    if opset >= PER_CHANNEL_OPSET:
        return model, True
    try:
        converted = onnx.version_converter.convert_version(model, PER_CHANNEL_OPSET)
        onnx.checker.check_model(converted)
        return converted, True
    except Exception:  # the converter lacks an adapter for some node: per-tensor scales at the model's opset
        logging.getLogger("onnx_consensus").warning(
            "int8: opset %d could not be converted to %d: weights quantized per tensor", opset, PER_CHANNEL_OPSET)
        return model, False


@register_format("int4")
def _int4(model: onnx.ModelProto, batches) -> onnx.ModelProto:
    """MatMul weights to MatMulNBits (4 bits, symmetric, blocks of ``INT4_BLOCK``); other ops stay float."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.ModelProto.FromString(model.SerializeToString()),
                             algo_config=DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK, is_symmetric=True))
    q.process()
    out = q.model.model
    if not any(n.op_type == "MatMulNBits" for n in out.graph.node):
        raise InputError("--quantize int4 quantizes MatMul weights only (MatMulNBits) and the model has no MatMul "
                         "over a constant weight it can take: use --quantize int8 (or fp16) for this model")
    return out


@register_format("fp16")
def _fp16(model: onnx.ModelProto, batches) -> onnx.ModelProto:
    """Float16 weights and arithmetic, float32 inputs and outputs (Cast nodes at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from .graph.ir import from_gs, to_gs

    half = convert_float_to_float16(onnx.ModelProto.FromString(model.SerializeToString()), keep_io_types=True)
    return from_gs(to_gs(half, infer=False), half)  # the converter appends the edge Casts last: re-sort
