"""Issue 25, item 1: external-data tensors in node attributes (a ``Constant``'s value) and in subgraphs, as
optimum writes them past 2 GB and as ``onnx.save_model(..., convert_attribute=True)`` writes them at any size:
inspected, pruned and written, the written model equal (onnxruntime) to the unpruned model with the same blocks
removed in memory."""
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnx_consensus.cli import main
from onnx_consensus.graph import weights
from onnx_consensus.graph.blocks import find_blocks
from onnx_consensus.graph.ir import interface, load_model
from onnx_consensus.graph.surgery import remove_blocks
from onnx_consensus.report import sha256_file
from tests.helpers import residual_mlp, run, temporaries

WIDTH = 16


def constants_model(with_if: bool = True) -> onnx.ModelProto:
    """residual_mlp(4) with: block 1's weight a Constant node, a 16-float Constant scale on the input (the
    128-byte rotary ``inv_freq`` of optimum's exports, in small), and (``with_if``) an If whose branches hold
    a Constant bias (a subgraph tensor)."""
    m = residual_mlp(4, WIDTH)
    g = m.graph
    w1 = next(t for t in g.initializer if t.name == "w1")
    g.initializer.remove(w1)
    scale = numpy_helper.from_array(np.linspace(0.5, 1.5, WIDTH, dtype=np.float32), "s")
    bias = np.arange(10, dtype=np.float32) / 10

    def branch(name, value):
        return helper.make_graph([helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))],
                                 f"b_{name}", [], [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [10])])

    for n in g.node:
        if n.input and n.input[0] == "x":
            n.input[0] = "xs"
        if n.output[0] == "logits" and with_if:
            n.output[0] = "pre"
    g.node.insert(0, helper.make_node("Constant", [], ["w1"], value=w1))
    g.node.insert(0, helper.make_node("Mul", ["x", "s"], ["xs"]))
    g.node.insert(0, helper.make_node("Constant", [], ["s"], value=scale))
    if with_if:
        g.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
        g.node.append(helper.make_node("If", ["cond"], ["bias"], then_branch=branch("bt", bias),
                                       else_branch=branch("be", -bias)))
        g.node.append(helper.make_node("Add", ["pre", "bias"], ["logits"]))
    onnx.checker.check_model(m, full_check=True)
    return m


def save_attributes_external(model, path):
    """Save a copy of ``model`` (onnx.save_model moves the tensors of the proto it is given)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=16, convert_attribute=True)


def _attribute_tensors(graph):
    """The tensors of ``graph``'s node attributes, subgraphs included (walked here, independently of the
    package's ``weights.other_tensors``)."""
    for n in graph.node:
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from g.initializer
                yield from _attribute_tensors(g)


def _external_attributes(path) -> int:
    m = onnx.load(path, load_external_data=False)
    return sum(1 for t in _attribute_tensors(m.graph) if t.data_location == onnx.TensorProto.EXTERNAL)


@pytest.mark.parametrize("inline_max", [2**20, 0])
def test_external_attribute_tensors_inspect_prune_write(tmp_path, monkeypatch, capsys, inline_max):
    """inline_max 0: attribute tensors stay in the data file after loading (sessions read them inline, the
    writer streams them into the output's data file), as a Constant over INLINE_MAX_BYTES would."""
    monkeypatch.setattr(weights, "INLINE_MAX_BYTES", inline_max, raising=False)
    model = constants_model()
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = src_dir / "model.onnx"
    save_attributes_external(model, src)
    assert _external_attributes(src) == 4  # w1, s and both branches' biases are in model.onnx_data
    x = np.random.default_rng(0).standard_normal((40, WIDTH)).astype(np.float32)
    np.save(tmp_path / "calib.npy", x)
    hashes = {f: sha256_file(src_dir / f) for f in os.listdir(src_dir)}

    assert main(["inspect", str(src)]) == 0
    assert "4 removable block(s)" in capsys.readouterr().out

    out = out_dir / "p.onnx"
    assert main([str(src), str(out), "--calib", str(tmp_path / "calib.npy"), "--remove", "2", "-q",
                 "--no-latency", "--report", str(tmp_path / "r.json")]) == 0
    assert {f: sha256_file(src_dir / f) for f in os.listdir(src_dir)} == hashes
    assert sorted(os.listdir(out_dir)) == ["p.onnx", "p.onnx.data"] and temporaries(out_dir) == []
    onnx.checker.check_model(str(out), full_check=True)
    written = onnx.load(out, load_external_data=False)
    tensors = list(written.graph.initializer) + list(_attribute_tensors(written.graph))
    locations = {e.value for t in tensors for e in t.external_data if e.key == "location"}
    assert locations == {"p.onnx.data"}
    import json

    removed = json.load(open(tmp_path / "r.json"))["removed_ids"]
    expected = remove_blocks(model, [b for b in find_blocks(model).blocks if b.id in removed])
    got = run(onnx.load(out), {"x": x[:8]})[0]
    np.testing.assert_allclose(got, run(expected, {"x": x[:8]})[0], rtol=1e-5, atol=1e-6)
    assert interface(onnx.load(out)) == interface(model)


def test_loaded_attribute_tensors_are_inline_and_confined(tmp_path):
    """Loading reads small attribute tensors inline through the checked path; a location escaping the
    folder in a subgraph's Constant is refused like an initializer's."""
    save_attributes_external(constants_model(), tmp_path / "model.onnx")
    m = load_model(tmp_path / "model.onnx")
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in _attribute_tensors(m.graph))
    raw = onnx.load(tmp_path / "model.onnx", load_external_data=False)
    branch = next(n for n in raw.graph.node if n.op_type == "If").attribute[0].g
    for e in branch.node[0].attribute[0].t.external_data:
        if e.key == "location":
            e.value = "../model.onnx_data"
    onnx.save(raw, tmp_path / "model.onnx")
    (tmp_path / "sub").mkdir()
    os.replace(tmp_path / "model.onnx", tmp_path / "sub" / "model.onnx")
    os.replace(tmp_path / "model.onnx_data", tmp_path / "sub" / "model.onnx_data")
    code = main(["inspect", str(tmp_path / "sub" / "model.onnx")])
    assert code == 2


def test_decoder_folder_with_external_constants(tmp_path):
    """An optimum-like export folder whose Constant nodes keep their tensors in the data file (every
    initializer of the synthetic decoder turned into a Constant): the pruned folder equals the decoder built
    without the layer."""
    from onnx_consensus.graph.decoder import dummy_feed
    from onnx_consensus.llm.folder import prune_folder
    from tests.test_decoder_llm import V, _session, synthetic_decoder

    model = synthetic_decoder("plain")
    g = model.graph
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in g.initializer]
    del g.initializer[:]
    for n in reversed(consts):
        g.node.insert(0, n)
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(model, str(src / "model.onnx"), save_as_external_data=True, location="model.onnx_data",
                    size_threshold=0, convert_attribute=True)
    assert _external_attributes(src / "model.onnx") == len(consts)
    prune_folder(src, tmp_path / "out", [2])
    pruned = onnx.load(str(tmp_path / "out" / "model.onnx"))
    ref = _session(synthetic_decoder("plain", [0, 1, 3]))
    feed = dummy_feed(pruned, batch=1, seq=3, vocab=V)
    for a, b in zip(_session(pruned).run(None, feed), ref.run(None, feed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bridge_reads_external_attribute_tensors(tmp_path, monkeypatch):
    """Constant tensors kept in the data file after loading (over INLINE_MAX_BYTES) feed the PyTorch bridge
    from their mapped file: its forward pass equals onnxruntime's on the original model."""
    torch = pytest.importorskip("torch")
    from onnx_consensus.bridge import to_torch

    monkeypatch.setattr(weights, "INLINE_MAX_BYTES", 0, raising=False)
    model = constants_model(with_if=False)  # the bridge has no If
    save_attributes_external(model, tmp_path / "model.onnx")
    loaded = load_model(tmp_path / "model.onnx")
    x = np.random.default_rng(1).standard_normal((4, WIDTH)).astype(np.float32)
    with torch.no_grad():
        got = to_torch(loaded)(torch.from_numpy(x))
    got = got[0] if isinstance(got, (tuple, list)) else got
    np.testing.assert_allclose(got.numpy(), run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_external_attribute_tensors_over_the_budget_refused(tmp_path, monkeypatch):
    """A Constant kept in the data file is read whole into each session: over the memory budget it is refused
    at load (here with the budget cut to 512 bytes: block 1's 1 KB weight is over it)."""
    from onnx_consensus.errors import ResourceLimitError
    from onnx_consensus.graph import sanity

    monkeypatch.setattr(weights, "INLINE_MAX_BYTES", 0, raising=False)
    save_attributes_external(constants_model(with_if=False), tmp_path / "model.onnx")
    sanity.check_model(load_model(tmp_path / "model.onnx"))  # within the default budget
    monkeypatch.setattr(sanity, "memory_budget", lambda: 512)
    with pytest.raises(ResourceLimitError, match="external tensor 'w1'"):
        load_model(tmp_path / "model.onnx")
