"""graph/weights.py: one threshold and one FLOAT_TYPES for weight-free copies, external data written and
mapped back, one ValueInfo parser; and the layering rule that graph/ never imports runtime."""
from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_consensus.data import model_input_specs
from onnx_consensus.graph import dtypes, flops, weights
from onnx_consensus.graph.ir import TensorSpec, interface, tensor_spec, to_gs

ROOT = pathlib.Path(__file__).resolve().parents[1]
GRAPH = ROOT / "onnx_consensus" / "graph"


# ---------------------------------------------------------------- layering


def _runtime_imports(source: str, depth: int) -> list[str]:
    """Modules and names reaching onnx_consensus.runtime that the import statements of ``source`` (anywhere
    in it, function bodies included) import; ``depth``: package levels of its module below onnx_consensus
    (1 for onnx_consensus/graph/x.py)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("onnx_consensus.runtime")]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                module = node.module or ""
            elif node.level > depth:  # climbs to onnx_consensus (or above)
                module = ".".join(["onnx_consensus"] + ([node.module] if node.module else []))
            else:
                continue  # stays inside graph/
            names = [module] + [f"{module}.{a.name}" for a in node.names]
            found += [n for n in names if n == "onnx_consensus.runtime" or n.startswith("onnx_consensus.runtime.")]
    return found


def test_graph_never_imports_runtime_in_source():
    files = sorted(GRAPH.rglob("*.py"))
    assert GRAPH / "weights.py" in files
    offenders = {}
    for p in files:
        depth = len(p.relative_to(ROOT / "onnx_consensus").parts) - 1
        if hits := _runtime_imports(p.read_text(), depth):
            offenders[str(p.relative_to(ROOT))] = hits
    assert offenders == {}


def test_the_ast_check_sees_lazy_and_package_imports():
    """The check above would catch the import graph/precision.py used to make inside a function, and the
    same from a module one package deeper (graph/blocks/ as a package)."""
    lazy = "def f():\n    from ..runtime import external_array\n    return external_array\n"
    assert _runtime_imports(lazy, 1) == ["onnx_consensus.runtime", "onnx_consensus.runtime.external_array"]
    assert _runtime_imports(lazy, 2) == []  # onnx_consensus.graph.runtime: not ours
    assert _runtime_imports("from ... import runtime\n", 2) == ["onnx_consensus.runtime"]
    assert _runtime_imports("import onnx_consensus.runtime as r\n", 1) == ["onnx_consensus.runtime"]
    assert _runtime_imports("from .weights import external_array\n", 1) == []


def test_graph_modules_import_and_work_with_runtime_blocked():
    """Every graph module imports, and the weight functions run, in a process where importing
    onnx_consensus.runtime fails."""
    code = (
        "import sys, pkgutil, importlib\n"
        "sys.modules['onnx_consensus.runtime'] = None\n"
        "import onnx_consensus.graph as g\n"
        "for m in pkgutil.walk_packages(g.__path__, 'onnx_consensus.graph.'):\n"
        "    importlib.import_module(m.name)\n"
        "from onnx_consensus.graph import weights, precision\n"
        "import onnx, numpy as np\n"
        "from onnx import helper, numpy_helper, TensorProto\n"
        "w = numpy_helper.from_array(np.ones((64, 32), np.float32), 'w')\n"
        "g = helper.make_graph([helper.make_node('MatMul', ['x', 'w'], ['y'])], 'g',\n"
        "    [helper.make_tensor_value_info('x', TensorProto.FLOAT, ['N', 64])],\n"
        "    [helper.make_tensor_value_info('y', TensorProto.FLOAT, ['N', 32])], initializer=[w])\n"
        "m = helper.make_model(g)\n"
        "assert weights.weightless(m).graph.initializer[0].data_location == TensorProto.EXTERNAL\n"
        "precision.float32_shadow(m)\n"
        "assert 'onnx_consensus.runtime' not in sys.modules or sys.modules['onnx_consensus.runtime'] is None\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ---------------------------------------------------------------- one threshold, one FLOAT_TYPES


def _model_with(inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", [t.name], [t.name + "_out"]) for t in inits]
    outs = [helper.make_tensor_value_info(t.name + "_out", t.data_type, list(t.dims)) for t in inits]
    g = helper.make_graph(nodes, "g", [], outs, initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_weight_free_copies_share_one_threshold_and_one_float_set():
    n = weights.STUB_MIN_ELEMENTS
    inits = [
        numpy_helper.from_array(np.ones(n, np.float32), "at_threshold"),
        numpy_helper.from_array(np.ones(n - 1, np.float32), "below"),
        numpy_helper.from_array(np.ones(n, np.int64), "int_at_threshold"),
        numpy_helper.from_array(np.ones(n, np.float16), "half_at_threshold"),
    ]
    model = _model_with(inits)
    stubbed = {t.name for t in weights.weightless(model).graph.initializer
               if t.data_location == TensorProto.EXTERNAL}
    as_inputs = {i.name for i in flops._weight_free_copy(model, {}, 1).graph.input}
    assert stubbed == as_inputs == {"at_threshold", "half_at_threshold"}
    assert flops.FLOAT_TYPES is weights.FLOAT_TYPES is dtypes.FLOAT_TYPES
    assert {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE} <= weights.FLOAT_TYPES
    assert TensorProto.INT64 not in weights.FLOAT_TYPES
    # the stubs keep name, dtype and dims, and the copy costs no weight bytes
    stub = {t.name: t for t in weights.weightless(model).graph.initializer}["at_threshold"]
    assert (stub.data_type, list(stub.dims), stub.raw_data) == (TensorProto.FLOAT, [n], b"")


def test_initializer_bytes_counts_inline_and_external_alike(tmp_path):
    model = _model_with([numpy_helper.from_array(np.ones((300, 10), np.float32), "a"),
                         numpy_helper.from_array(np.ones(7, np.int64), "b")])
    assert weights.initializer_bytes(model) == 300 * 10 * 4 + 7 * 8
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, location="m.bin", size_threshold=0)
    loaded = onnx.load(path, load_external_data=False)
    assert weights.initializer_bytes(loaded) == 300 * 10 * 4 + 7 * 8


# ---------------------------------------------------------------- writing and mapping external data


def test_write_external_then_map_back(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.standard_normal((40, 50)).astype(np.float32)
    small = np.arange(5, dtype=np.int64)
    half = rng.standard_normal(1000).astype(np.float16)
    model = _model_with([numpy_helper.from_array(big, "big"), numpy_helper.from_array(small, "small"),
                         numpy_helper.from_array(half, "half")])
    # an input already external (mapped from another file) is copied from its map
    src = tmp_path / "src.onnx"
    onnx.save(onnx.ModelProto.FromString(model.SerializeToString()), src, save_as_external_data=True,
              location="src.bin", size_threshold=0)  # (onnx.save moves the data out of the proto it is given)
    loaded = onnx.load(src, load_external_data=False)
    weights.absolute_locations(loaded, str(tmp_path))
    assert all(weights.is_external(t) for t in loaded.graph.initializer)
    assert weights.external_array(loaded.graph.initializer[0]) is weights.external_array(loaded.graph.initializer[0])

    for source in (model, loaded):
        out = onnx.ModelProto()
        out.CopyFrom(source)
        name = f"out{id(source)}.bin"
        with open(tmp_path / name, "wb") as f:
            weights.write_external(out, f, name)
        by_name = {t.name: t for t in out.graph.initializer}
        if source is model:  # inline tensors under 1 KiB stay inline
            assert not weights.is_external(by_name["small"])
        else:  # external ones move whatever their size
            assert weights.is_external(by_name["small"])
        offsets = [int({e.key: e.value for e in t.external_data}["offset"])
                   for t in out.graph.initializer if weights.is_external(t)]
        assert offsets and all(o % 4096 == 0 for o in offsets)
        weights.absolute_locations(out, str(tmp_path))
        for t, want in zip(out.graph.initializer, (big, small, half)):
            np.testing.assert_array_equal(weights.tensor_array(t), want)
        # and the checker reads the same file back
        saved = tmp_path / f"{name}.onnx"
        for t in out.graph.initializer:
            weights.set_location(t, name)
        onnx.save(out, saved)
        onnx.checker.check_model(str(saved), full_check=True)
        np.testing.assert_array_equal(numpy_helper.to_array(onnx.load(saved).graph.initializer[0]), big)


def test_write_inline_streams_external_tensors_into_one_protobuf(tmp_path):
    """``write_inline``: a model whose weights are partly external (mapped from a file) and partly inline is
    written as one file with every initializer inline, in the model's order, that parses to the model saved
    fully inline (onnx, and onnxruntime computes the same); the model given keeps its external tensors."""
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    inline = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    mixed = onnx.ModelProto()
    mixed.CopyFrom(inline)
    with open(tmp_path / "w.bin", "wb") as f:  # w external (its own file, absolute location), b inline
        weights.write_external(mixed, f, str(tmp_path / "w.bin"), min_bytes=64)
    assert [weights.is_external(t) for t in mixed.graph.initializer] == [True, False]
    before = mixed.SerializeToString()
    with open(tmp_path / "out.onnx", "wb") as f:
        weights.write_inline(mixed, f)
    assert mixed.SerializeToString() == before
    back = onnx.load(str(tmp_path / "out.onnx"))
    assert back == inline  # the same message: graph fields merged, initializers in order, all inline
    onnx.checker.check_model(back, full_check=True)
    x = rng.standard_normal((2, 6)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got[0], x @ w + b, rtol=1e-6)


# ---------------------------------------------------------------- one ValueInfo parser


def test_tensor_spec_is_the_one_parser():
    vi = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 3, None, 8])
    spec = tensor_spec(vi)
    assert spec.name == "x" and spec.dtype.name == "bfloat16" and spec.shape == ("N", 3, None, 8)
    assert tensor_spec(helper.make_tensor_value_info("u", TensorProto.FLOAT, None)) == TensorSpec("u", np.dtype(np.float32), None)
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    assert tensor_spec(seq) == TensorSpec("s", None, None)

    # interface, the calibration input specs, to_gs and the MAC counter read the same dims
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, None, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, None, 8])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    ins, outs = interface(model)
    assert model_input_specs(model) == list(ins)
    assert ins[0] == TensorSpec("x", np.dtype(np.float32), ("N", 3, None, 8))
    # (shape inference, before to_gs parses its result, names an unknown dim "unk__0")
    assert list(to_gs(model).tensors()["y"].shape) in (list(outs[0].shape), ["N", 3, "unk__0", 8])
    assert flops._value_info_shapes(list(model.graph.input)) == [(None, 3, None, 8)]
