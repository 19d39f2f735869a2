"""Initializer bytes wherever they live: external-data tensors, weight stubs, weight-free copies, writing.

A model loaded by ``ir.load_model_and_layout`` keeps external-data tensors in their files: each tensor's
location is made absolute (``absolute_locations``) and readers map the bytes when they need them
(``external_array``: one read-only memory map per tensor, shared by the whole process). A *stub* is a
tensor whose name, dtype and dims are kept but whose data is dropped (marked as external data at
``STUB_LOCATION``, a file that is never read); a *weight-free copy* (``weightless``) stubs every float
initializer of at least ``STUB_MIN_ELEMENTS`` elements, so shape inference and graph surgery cost memory
for the graph, not the weights. ``write_external`` streams a model's tensors into one data file.

This module knows nothing of onnxruntime: ``runtime`` builds sessions over these arrays (the graph
package never imports ``runtime``).
"""
from __future__ import annotations

import math
import os
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

__all__ = [
    "FLOAT_TYPES", "STUB_LOCATION", "STUB_MIN_ELEMENTS", "is_external", "has_external_tensors",
    "absolute_locations", "external_array", "release_mapped_pages",
    "tensor_array", "numel", "tensor_nbytes", "initializer_bytes",
    "is_weight", "make_stub", "weightless", "write_external", "set_location",
]

#: ONNX element types that are floating point: the types of learned weights, counted as parameters and
#: stubbed in weight-free copies.
FLOAT_TYPES = frozenset(
    t
    for t in (
        TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16,
        getattr(TensorProto, "FLOAT8E4M3FN", None), getattr(TensorProto, "FLOAT8E4M3FNUZ", None),
        getattr(TensorProto, "FLOAT8E5M2", None), getattr(TensorProto, "FLOAT8E5M2FNUZ", None),
        getattr(TensorProto, "FLOAT4E2M1", None), getattr(TensorProto, "FLOAT8E8M0", None),
    )
    if t is not None
)

STUB_LOCATION = "shared-initializers.bin"  # external-data location of stubbed weights (never read)
#: Float initializers with at least this many elements are weights (stubbed in weight-free copies); smaller
#: ones and non-float ones (shapes, axes, scalars) keep their values, which shape inference may need.
STUB_MIN_ELEMENTS = 1024

_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                "string_data")


def numel(dims) -> int:
    """Number of elements of a tensor with ``dims`` (1 for a scalar)."""
    return int(math.prod(int(d) for d in dims))


def _np_dtype(t: TensorProto) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))


def tensor_nbytes(t: TensorProto) -> int:
    """Bytes of ``t``'s values as numpy holds them (dims x item size), whether inline or external."""
    return numel(t.dims) * _np_dtype(t).itemsize


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the main graph's initializers (stored inline or as external data)."""
    return sum(tensor_nbytes(t) for t in model.graph.initializer)


def is_weight(t: TensorProto, min_elements: int = STUB_MIN_ELEMENTS) -> bool:
    """Whether ``t`` is a float tensor of at least ``min_elements`` elements: the tensors a weight-free copy
    drops the data of (``weightless`` here, ``flops``' shape-inference copy)."""
    return t.data_type in FLOAT_TYPES and numel(t.dims) >= min_elements


# ------------------------------------------------------------------------------ external data

def is_external(t: TensorProto) -> bool:
    """A tensor whose bytes are in a file (see ``absolute_locations``), not in the proto."""
    return t.data_location == TensorProto.EXTERNAL and not t.HasField("raw_data")


def has_external_tensors(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in model.graph.initializer)


def _external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def absolute_locations(model: onnx.ModelProto, base: str) -> None:
    """Make every external tensor's location an absolute path (relative ones are taken from folder
    ``base``), in place. Raises ValueError when a data file is missing or too short for a tensor."""
    sizes: dict[str, int] = {}
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = _external_info(t)
        loc = os.path.normpath(os.path.join(base, info.get("location", "")))
        if loc not in sizes:
            if not os.path.isfile(loc):
                raise ValueError(f"external data file {loc} (tensor {t.name}) not found")
            sizes[loc] = os.path.getsize(loc)
        need = int(info.get("offset", 0)) + int(info.get("length", tensor_nbytes(t)))
        if need > sizes[loc]:
            raise ValueError(f"external data file {loc} is too short for tensor {t.name}")
        set_location(t, loc)


_MAPS: dict[tuple, np.ndarray] = {}


def external_array(t: TensorProto) -> np.ndarray:
    """A read-only memory map of external tensor ``t``'s bytes (shape ``t.dims``, little-endian dtype of
    ``t.data_type``; its location must be an absolute path). Maps are cached per (file, offset, shape,
    dtype) for the life of the process: every session and reader shares one mapping, and the pages are the
    file's (page cache), not a private copy. The same tensor always gives the same array object."""
    info = _external_info(t)
    dtype = _np_dtype(t).newbyteorder("<")
    shape = tuple(int(d) for d in t.dims)
    key = (info["location"], int(info.get("offset", 0)), shape, dtype.str)
    if key not in _MAPS:
        if not os.path.isabs(info["location"]):
            raise ValueError(f"external tensor {t.name} has a relative location; load it with load_model_and_layout")
        _MAPS[key] = np.memmap(info["location"], dtype=dtype, mode="r", offset=key[1], shape=shape) if shape else \
            np.fromfile(info["location"], dtype=dtype, count=1, offset=key[1]).reshape(())
    return _MAPS[key]


def release_mapped_pages() -> int:
    """Drop the resident pages of every shared memory map (``external_array``) from this process
    (``madvise(MADV_DONTNEED)``): the maps stay valid and fault their pages back in from the page cache on the
    next read, but until then they no longer count in the process's resident memory. Called before a step that
    maps other weights (the written model's check run), so the two never count at once. Returns the bytes
    advised (0 where the platform has no madvise)."""
    import mmap

    advice = getattr(mmap, "MADV_DONTNEED", None)
    done = 0
    for arr in _MAPS.values():
        m = getattr(arr, "_mmap", None)
        if advice is None or m is None or not hasattr(m, "madvise"):
            continue
        m.madvise(advice)
        done += len(m)
    return done


def tensor_array(t: TensorProto) -> np.ndarray:
    """``t``'s values: the shared memory map for an external tensor, else a decoded copy."""
    return external_array(t) if is_external(t) else numpy_helper.to_array(t)


# ------------------------------------------------------------------------------ stubs, weight-free copies

def _clear_data(t: TensorProto) -> None:
    for field in _DATA_FIELDS:
        t.ClearField(field)
    del t.external_data[:]


def make_stub(t: TensorProto) -> None:
    """Turn ``t`` into a stub in place: name, dtype and dims kept, data dropped, marked as external data
    at STUB_LOCATION (whoever runs it supplies the values, e.g. ``runtime.SharedWeights``)."""
    _clear_data(t)
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=STUB_LOCATION)


def weightless(model: onnx.ModelProto, min_elements: int = STUB_MIN_ELEMENTS) -> onnx.ModelProto:
    """A copy of ``model`` whose weights (``is_weight(t, min_elements)``) are stubs (``make_stub``); other
    initializers (integer tensors, small floats) keep their data. Shape inference and graph surgery on it
    cost memory for the graph, not the weights; ``runtime.SharedWeights`` supplies the values to sessions."""
    out = onnx.ModelProto()
    graph = model.graph
    out.CopyFrom(onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import,
                                 metadata_props=model.metadata_props, functions=model.functions,
                                 producer_name=model.producer_name, producer_version=model.producer_version,
                                 domain=model.domain, model_version=model.model_version,
                                 doc_string=model.doc_string))
    g = out.graph
    g.name, g.doc_string = graph.name, graph.doc_string
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(g, field).extend(getattr(graph, field))
    for t in graph.initializer:
        if is_weight(t, min_elements):
            make_stub(g.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims))
        else:
            g.initializer.add().CopyFrom(t)
    return out


# ------------------------------------------------------------------------------ writing

def set_location(t: TensorProto, location: str) -> None:
    """Point external tensor ``t`` at file ``location`` (offset and length unchanged)."""
    for e in t.external_data:
        if e.key == "location":
            e.value = location


def write_external(model: onnx.ModelProto, f: BinaryIO, location: str, *, min_bytes: int = 1024,
                   align: int = 4096) -> None:
    """Move the main graph's initializer bytes to the end of open file ``f``, tensor by tensor, and point
    the tensors (in place) at ``location`` with their offsets. Memory-mapped external tensors are copied
    from their files, never decoded whole; inline tensors under ``min_bytes`` stay inline; every tensor
    starts at a multiple of ``align`` bytes, so onnxruntime can map it."""
    for t in model.graph.initializer:
        _write_tensor(t, f, location, min_bytes, align)


def _write_tensor(t: TensorProto, f: BinaryIO, location: str, min_bytes: int, align: int) -> None:
    external = is_external(t)
    if external:
        data = np.ascontiguousarray(external_array(t))
    elif t.HasField("raw_data"):
        data = t.raw_data
    else:
        arr = numpy_helper.to_array(t)
        if arr.nbytes < min_bytes or arr.dtype == object:
            return
        data = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
    size = data.nbytes if isinstance(data, np.ndarray) else len(data)
    if size < min_bytes and not external:
        return
    f.write(b"\0" * (-f.tell() % align))
    offset = f.tell()
    f.write(data.data if isinstance(data, np.ndarray) else data)
    _clear_data(t)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(size))):
        t.external_data.add(key=key, value=value)
