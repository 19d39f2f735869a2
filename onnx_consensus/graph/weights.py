"""Initializer bytes wherever they live: external-data tensors, weight stubs, weight-free copies, writing.

A model loaded by ``ir.load_model_and_layout`` keeps external-data tensors in their files: each tensor's
location is checked (confined to the model's folder, ``paths.confined_file``; offset and length within the file)
and made absolute (``absolute_locations``), and readers map the bytes when they need them (``external_array``:
one read-only memory map per tensor, shared by the whole process). External tensors are found wherever a model
holds tensors (``all_tensors``: initializers, node attributes such as a ``Constant``'s value, subgraphs,
functions); the ones outside the main graph's initializers are brought inline at load when small
(``INLINE_MAX_BYTES``), so every reader sees them as ordinary tensors. A *stub* is a
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
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import InputError
from ..paths import confined_file
from .dtypes import FLOAT_TYPES

__all__ = [
    "STUB_LOCATION", "STUB_MIN_ELEMENTS", "INLINE_MAX_BYTES", "all_tensors", "other_tensors",
    "is_external", "has_external_tensors", "inline_external",
    "absolute_locations", "external_array", "tensor_array", "numel", "tensor_nbytes", "initializer_bytes",
    "is_weight", "make_stub", "weightless", "write_external", "set_location", "relocate", "stored_nbytes",
    "release_mapped_pages",
]

STUB_LOCATION = "shared-initializers.bin"  # external-data location of stubbed weights (never read)
#: Float initializers with at least this many elements are weights (stubbed in weight-free copies); smaller
#: ones and non-float ones (shapes, axes, scalars) keep their values, which shape inference may need.
STUB_MIN_ELEMENTS = 1024
#: External tensors outside the main graph's initializers (node attributes, subgraph initializers) up to this
#: size are read inline at load (optimum keeps even a 128-byte ``Constant`` in its data file past 2 GB).
INLINE_MAX_BYTES = 2**20
#: ONNX types stored two elements per byte (their external data is half as long as numpy's view of them).
_PACKED = frozenset(getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, n))

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


def stored_nbytes(t: TensorProto) -> int:
    """Bytes ``t``'s values take in a file (4-bit types packed two to a byte)."""
    n = numel(t.dims)
    return (n + 1) // 2 if t.data_type in _PACKED else n * _np_dtype(t).itemsize


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


def _beyond_initializers(graph: onnx.GraphProto, functions=()) -> Iterator[TensorProto]:
    """The tensors of ``graph`` (and of ``functions``' nodes) other than its own initializers: sparse
    initializers, node attributes, and every tensor of nested subgraphs (walked with a stack, not recursion)."""
    stack: list = []
    for sp in graph.sparse_initializer:
        yield sp.values
        yield sp.indices
    yield from _node_tensors(graph.node, stack)
    for fn in functions:
        yield from _node_tensors(fn.node, stack)
    while stack:
        g = stack.pop()
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        yield from _node_tensors(g.node, stack)


def _node_tensors(nodes, stack: list) -> Iterator[TensorProto]:
    for n in nodes:
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sp in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
                yield sp.values
                yield sp.indices
            if a.HasField("g"):
                stack.append(a.g)
            stack.extend(a.graphs)


def other_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto of ``model`` except the main graph's initializers: node attributes (a ``Constant``'s
    value), subgraphs' initializers and attributes, sparse tensors, local functions' attributes."""
    return _beyond_initializers(model.graph, model.functions)


def all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto of ``model``: the main graph's initializers, then ``other_tensors``."""
    yield from model.graph.initializer
    yield from other_tensors(model)


def has_external_tensors(model: onnx.ModelProto) -> bool:
    """Whether any tensor of ``model`` (``all_tensors``) keeps its bytes in a file."""
    return any(is_external(t) for t in all_tensors(model))


def _external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _checked_span(t: TensorProto, info: dict[str, str], size: int, loc: str) -> None:
    """InputError unless ``t``'s offset and length are non-negative integers within the file's ``size``."""
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise InputError(f"external data of tensor {t.name!r}: offset or length is not an integer") from None
    need = stored_nbytes(t)
    if offset < 0 or (length is not None and length < 0):
        raise InputError(f"external data of tensor {t.name!r}: negative offset or length")
    if length is not None and length < need:
        raise InputError(f"external data of tensor {t.name!r}: length {length} is shorter than its "
                         f"{need} bytes (dims {list(t.dims)})")
    if offset + max(need, length or 0) > size:
        raise InputError(f"external data file {loc} is too short for tensor {t.name!r} (needs bytes up to "
                         f"{offset + max(need, length or 0)}, has {size})")


def absolute_locations(model: onnx.ModelProto, base: str, *, inline_max: int | None = None) -> None:
    """Check every external tensor of ``model`` (``all_tensors``) and make its location absolute, in place.

    Each location must name a regular file inside folder ``base`` (``paths.confined_file``: no absolute path,
    no ``..`` escape, no symbolic link out of it, no device or FIFO; UnsafePathError), and the tensor's offset
    and length must lie within that file (InputError): all checked before a byte is read. Tensors outside the
    main graph's initializers of at most ``inline_max`` bytes (default ``INLINE_MAX_BYTES``) are then read
    inline (``inline_external``)."""
    inline_max = INLINE_MAX_BYTES if inline_max is None else inline_max
    sizes: dict[str, int] = {}
    for t in all_tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        if t.data_type == TensorProto.STRING:
            raise InputError(f"external data of tensor {t.name!r}: string tensors cannot be external")
        info = _external_info(t)
        loc = confined_file(base, info.get("location", ""), what=f"external data of tensor {t.name!r}")
        if loc not in sizes:
            sizes[loc] = os.path.getsize(loc)
        _checked_span(t, info, sizes[loc], loc)
        set_location(t, loc)
    for t in other_tensors(model):
        if is_external(t) and stored_nbytes(t) <= inline_max:
            inline_external(t)


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


def inline_external(t: TensorProto) -> None:
    """Bring external tensor ``t``'s bytes into the proto (``raw_data``), in place."""
    info = _external_info(t)
    offset, count = int(info.get("offset", 0)), stored_nbytes(t)
    with open(info["location"], "rb") as f:
        f.seek(offset)
        data = f.read(count)
    _clear_data(t)
    t.data_location = TensorProto.DEFAULT
    t.raw_data = data


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
    """Move the main graph's initializer bytes, and every other external tensor's (node attributes,
    subgraphs: ``all_tensors``), to the end of open file ``f``, tensor by tensor, and point the tensors (in
    place) at ``location`` with their offsets. Memory-mapped external tensors are copied from their files,
    never decoded whole; inline initializers under ``min_bytes`` and inline tensors outside the main graph's
    initializers stay inline; every tensor starts at a multiple of ``align`` bytes, so onnxruntime can map
    it."""
    for t in model.graph.initializer:
        _write_tensor(t, f, location, min_bytes, align)
    for t in list(other_tensors(model)):
        if is_external(t):
            _write_tensor(t, f, location, min_bytes, align)


def relocate(model: onnx.ModelProto, location: str) -> None:
    """Point every external tensor of ``model`` (``all_tensors``) at file ``location``, in place."""
    for t in all_tensors(model):
        if is_external(t):
            set_location(t, location)


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


def _field_header(number: int, length: int) -> bytes:
    """A protobuf length-delimited field's tag and length (wire type 2)."""
    out, v = bytearray(), (number << 3) | 2
    for x in (v, length):
        while True:
            byte, x = x & 0x7F, x >> 7
            out.append(byte | (0x80 if x else 0))
            if not x:
                break
    return bytes(out)


MODEL_GRAPH_FIELD, GRAPH_INITIALIZER_FIELD = 7, 5  # ModelProto.graph, GraphProto.initializer (onnx.proto)


def _copy_fields(src, dst, skip: str) -> None:
    """Copy every set field of message ``src`` into ``dst`` but ``skip``."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if getattr(fd, "is_repeated", None) or getattr(fd, "label", None) == fd.LABEL_REPEATED:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose main graph has no initializers, made without copying them."""
    shell = onnx.ModelProto()
    _copy_fields(model, shell, skip="graph")
    _copy_fields(model.graph, shell.graph, skip="initializer")
    return shell


def write_inline(model: onnx.ModelProto, f: BinaryIO) -> None:
    """Serialise ``model`` to ``f`` as one protobuf with every main-graph initializer inline, external ones read
    from their files one tensor at a time: the model without initializers, then each initializer as a further
    ``graph`` field holding one ``initializer``, which protobuf parsers merge into the first (embedded messages
    given twice are merged, repeated fields appended), in the model's order. Memory: the graph and one tensor,
    not the whole serialised model beside an inline copy of the weights. ``model`` is not changed."""
    f.write(_without_initializers(model).SerializeToString())
    for t in model.graph.initializer:
        if is_external(t):
            inline = TensorProto()
            inline.CopyFrom(t)
            inline_external(inline)
            inline.ClearField("data_location")  # as a tensor saved inline has it: absent
            t = inline
        data = t.SerializeToString()
        inner = _field_header(GRAPH_INITIALIZER_FIELD, len(data))
        f.write(_field_header(MODEL_GRAPH_FIELD, len(inner) + len(data)) + inner)
        f.write(data)
