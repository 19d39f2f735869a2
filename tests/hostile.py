"""Hostile models and data files for the tests of issue 22 (tests/test_untrusted_limits.py, the fuzzer's hostile
cases in tests/test_fuzz_graphs.py): each builder takes a valid small model or folder and returns a file that
must be refused in one line (exit 2) before anything runs or is written."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import residual_mlp

WIDTH = 16
HUGE = 10**12  # elements: terabytes, over any memory budget


def base_model(blocks: int = 3) -> onnx.ModelProto:
    return residual_mlp(blocks, WIDTH)


def _append(model, nodes, inits=(), output=None):
    g = model.graph
    g.node.extend(nodes)
    g.initializer.extend(inits)
    if output is not None:
        g.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, None))
    return model


# ------------------------------------------------------------------ graphs (each takes a size parameter k >= 1)

def cycle(model, k):
    """Node i (the k-th, modulo the count) reads the output of a node downstream of it (or its own)."""
    nodes = model.graph.node
    i = k % len(nodes)
    downstream, frontier = [], {nodes[i].output[0]}
    for n in nodes[i + 1:]:
        if frontier & set(n.input):
            downstream.append(n)
            frontier |= set(n.output)
    last = downstream[-1] if downstream else nodes[i]
    if nodes[i].input:
        nodes[i].input[0] = last.output[0]
    else:
        nodes[i].input.append(last.output[0])
    return model


def duplicate_output(model, k):
    """Node k (modulo the count, never 0) produces the tensor node 0 produces."""
    nodes = model.graph.node
    nodes[1 + k % (len(nodes) - 1)].output[0] = nodes[0].output[0]
    return model


def duplicate_graph_output(model, k):
    model.graph.output.extend([model.graph.output[0]] * k)
    return model


def deep_nesting(model, k):
    """If nodes nested 17 + k levels deep (the limit is 16; protobuf parses up to about 33)."""
    depth = 17 + min(k, 10)

    def leaf(d):  # the else branches: one node each, so the model grows linearly with the depth
        return helper.make_graph([helper.make_node("Identity", ["x"], [f"e{d}"])], f"e{d}", [],
                                 [helper.make_tensor_value_info(f"e{d}", TensorProto.FLOAT, None)])

    inner = leaf(0)
    for d in range(1, depth):
        inner = helper.make_graph([helper.make_node("If", ["cond"], [f"y{d}"], then_branch=inner, else_branch=leaf(d))],
                                  f"g{d}", [], [helper.make_tensor_value_info(f"y{d}", TensorProto.FLOAT, None)])
    node = helper.make_node("If", ["cond"], ["deep"], then_branch=inner, else_branch=leaf(depth))
    return _append(model, [node], [numpy_helper.from_array(np.array(True), "cond")], "deep")


def huge_declared_input(model, k):
    dim = model.graph.input[0].type.tensor_type.shape.dim
    if not len(dim):
        dim.add()
    dim[0].ClearField("dim_param")
    dim[0].dim_value = HUGE * k
    return model


def constant_of_shape(model, k):
    shape = numpy_helper.from_array(np.array([HUGE, k], np.int64), "big_shape")
    return _append(model, [helper.make_node("ConstantOfShape", ["big_shape"], ["big"])], [shape], "big")


def expand(model, k):
    shape = numpy_helper.from_array(np.array([HUGE * k, 1], np.int64), "big_shape")
    x = model.graph.input[0].name
    return _append(model, [helper.make_node("Expand", [x, "big_shape"], ["big"])], [shape], "big")


def tile(model, k):
    x = model.graph.input[0]
    rank = len(x.type.tensor_type.shape.dim) or 2
    reps = helper.make_node("Constant", [], ["reps"],
                            value=numpy_helper.from_array(np.array([HUGE * k] + [1] * (rank - 1), np.int64)))
    return _append(model, [reps, helper.make_node("Tile", [x.name, "reps"], ["big"])], (), "big")


def huge_attribute_tensor(model, k):
    """A Constant whose tensor declares HUGE elements (and holds a few bytes)."""
    t = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[HUGE * k], raw_data=b"\0" * 16)
    return _append(model, [helper.make_node("Constant", [], ["c"], value=t)], (), "c")


def short_tensor(model, k):
    """An initializer whose raw data is k bytes short of its dims."""
    t = model.graph.initializer[0]
    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))  # raw_data, whatever it was
    t.raw_data = t.raw_data[: max(len(t.raw_data) - k, 0)] if len(t.raw_data) else b""
    if not t.dims or int(np.prod(t.dims)) == 0:
        t.dims.append(k)
    return model


def huge_sparse(model, k):
    values = numpy_helper.from_array(np.ones(1, np.float32), "sv")
    indices = numpy_helper.from_array(np.zeros(1, np.int64), "si")
    sp = helper.make_sparse_tensor(values, indices, [HUGE * k])
    return _append(model, [helper.make_node("Constant", [], ["sp"], sparse_value=sp)], (), "sp")


GRAPH_CASES = {f.__name__: f for f in (cycle, duplicate_output, duplicate_graph_output, deep_nesting,
                                       huge_declared_input, constant_of_shape, expand, tile, huge_attribute_tensor,
                                       short_tensor, huge_sparse)}


# ------------------------------------------------------------------ data files

def pickled_npz(path, k):
    arr = np.empty(k, dtype=object)
    arr[:] = [f"item{i}" for i in range(k)]
    np.savez(path, x=arr)


def compressed_bomb(path, nbytes):
    """An .npz whose one member, deflated to a few KB, declares and inflates to ``nbytes`` of float32 zeros."""
    n = nbytes // 4 // WIDTH
    np.savez_compressed(path, x=np.zeros((n, WIDTH), np.float32))


def png_header(path, width, height):
    """A PNG whose header says ``width`` x ``height`` (1-bit grey) and whose data is one empty chunk: Pillow
    reads the size without decoding anything."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


# ------------------------------------------------------------------ external data (model saved in folder d)

def _repoint(path, location=None, *, offset=None, length=None):
    m = onnx.load(path, load_external_data=False)
    t = next(t for t in m.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    for e in t.external_data:
        if e.key == "location" and location is not None:
            e.value = location
        elif e.key == "offset" and offset is not None:
            e.value = str(offset)
        elif e.key == "length" and length is not None:
            e.value = str(length)
    onnx.save(m, path)


def parent_escape(path, secret, k):
    _repoint(path, "/".join([".."] * k) + "/" + secret.name if k > 1 else "../" + secret.name)


def absolute_location(path, secret, k):
    _repoint(path, str(secret))


def symlink_out(path, secret, k):
    import os

    os.symlink(secret, path.parent / f"link{k}.bin")
    _repoint(path, f"link{k}.bin")


def fifo(path, secret, k):
    import os

    os.mkfifo(path.parent / f"fifo{k}.bin")
    _repoint(path, f"fifo{k}.bin")


def device(path, secret, k):
    import os

    os.symlink("/dev/zero", path.parent / f"zero{k}.bin")
    _repoint(path, f"zero{k}.bin")


def _data_size(path) -> int:
    import os

    return os.path.getsize(path.parent / "model.data")


def offset_beyond(path, secret, k):
    _repoint(path, offset=_data_size(path) + k)


def length_beyond(path, secret, k):
    _repoint(path, length=_data_size(path) + k)


def negative_offset(path, secret, k):
    _repoint(path, offset=-k)


EXTERNAL_CASES = {f.__name__: f for f in (parent_escape, absolute_location, symlink_out, fifo, device, offset_beyond,
                                          length_beyond, negative_offset)}
