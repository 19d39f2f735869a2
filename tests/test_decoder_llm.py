"""Decoder LLMs with a KV cache (issue 14): layer detection and removal with the cache.

Fast tests use small synthetic decoders written with onnx.helper in both residual forms (plain Add + norm;
fused SkipSimplifiedLayerNormalization as the onnxruntime-genai builder writes it); the pruned model must
equal the same decoder built without those layers, for prefill and for a decode step with a filled cache.
Slow tests use the real exports of tools/data/build_llms.py (built into .cache/llm when missing: minutes):
pruned exports against exports of the PyTorch model with the layers deleted, a greedy generation loop with
the cache in onnxruntime, and generation in onnxruntime-genai.
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_consensus.errors import InputError, TargetError
from onnx_consensus.graph.decoder import (FUSED, PLAIN, cache_names, dummy_feed, expose_residual_sums,
                                          find_decoder_layers)
from onnx_consensus.graph.kv_surgery import expected_interface, remove_layers
from onnx_consensus.llm.folder import prune_folder, update_configs
from tests.helpers import genai_generate

D, V, L = 8, 11, 4  # hidden size, vocabulary, layers of the synthetic decoders


# ---------------------------------------------------------------- synthetic decoders

def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {"E": rng.normal(0, 1, (V, D)).astype(np.float32), "final": rng.uniform(0.5, 1.5, D).astype(np.float32)}
    for i in range(L):
        for name in ("Wq", "Wk", "Wv", "Wo", "W1", "W2"):
            w[f"{name}{i}"] = rng.normal(0, 0.4, (D, D)).astype(np.float32)
        w[f"in{i}"] = rng.uniform(0.5, 1.5, D).astype(np.float32)
        w[f"post{i}"] = rng.uniform(0.5, 1.5, D).astype(np.float32)
    return w


def synthetic_decoder(form: str, keep: list[int] | None = None, seed: int = 0) -> onnx.ModelProto:
    """A pre-norm decoder with a KV cache: inputs input_ids (B, S), attention_mask (B, P+S), cache inputs
    past_key_values.j.key/value (B, 1, P, D); outputs logits (B, S, V), present.j.key/value (B, 1, P+S, D).
    Layers ``keep`` (original numbers, default all L) with their weights, caches numbered j = 0.. in order.
    Attention is single-head without a causal mask (enough for equivalence); every layer adds
    0 * (past length) read through Shape(past_key_values.0.key), as the exporters' causal masks do."""
    keep = list(range(L)) if keep is None else keep
    w = _weights(seed)
    nodes, inits = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(op, ins, outs, domain="", **attrs):
        nodes.append(helper.make_node(op, ins, outs, name=outs[0], domain=domain, **attrs))
        return outs[0]

    def norm(x, gamma, out):
        if form == FUSED:
            return node("SimplifiedLayerNormalization", [x, gamma], [out], epsilon=1e-5, axis=-1)
        return node("LayerNormalization", [x, gamma], [out], epsilon=1e-5, axis=-1)

    init("E", w["E"])
    init("ET", w["E"].T.copy())
    init("zero", np.float32(0))
    init("axes1", np.array([1], np.int64))
    init("two", np.array(2, np.int64))
    x = node("Gather", ["E", "input_ids"], ["emb"])
    shp = node("Shape", ["past_key_values.0.key"], ["past_shape"])
    plen = node("Gather", [shp, "two"], ["past_len"], axis=0)
    plenf = node("Cast", [plen], ["past_len_f"], to=TensorProto.FLOAT)
    bias = node("Mul", [plenf, "zero"], ["mask_bias"])
    stream = x
    h = None
    for j, i in enumerate(keep):
        g = init(f"g_in{i}", w[f"in{i}"])
        if form == FUSED:
            if j == 0:
                h = norm(stream, g, f"l{i}_in")
        else:
            h = norm(stream, g, f"l{i}_in")
        for name in ("Wq", "Wk", "Wv", "Wo", "W1", "W2"):
            init(f"{name}{i}", w[f"{name}{i}"])
        q = node("Unsqueeze", [node("MatMul", [h, f"Wq{i}"], [f"l{i}_q"]), "axes1"], [f"l{i}_qu"])
        k = node("Unsqueeze", [node("MatMul", [h, f"Wk{i}"], [f"l{i}_k"]), "axes1"], [f"l{i}_ku"])
        v = node("Unsqueeze", [node("MatMul", [h, f"Wv{i}"], [f"l{i}_v"]), "axes1"], [f"l{i}_vu"])
        pk = node("Concat", [f"past_key_values.{j}.key", k], [f"present.{j}.key"], axis=2)
        pv = node("Concat", [f"past_key_values.{j}.value", v], [f"present.{j}.value"], axis=2)
        kt = node("Transpose", [pk], [f"l{i}_kt"], perm=[0, 1, 3, 2])
        s = node("Add", [node("MatMul", [q, kt], [f"l{i}_s"]), bias], [f"l{i}_sb"])
        a = node("MatMul", [node("Softmax", [s], [f"l{i}_p"], axis=-1), pv], [f"l{i}_a"])
        a = node("Squeeze", [a, "axes1"], [f"l{i}_as"])
        o = node("MatMul", [a, f"Wo{i}"], [f"l{i}_o"])
        gp = init(f"g_post{i}", w[f"post{i}"])
        if form == FUSED:
            h2, _, _, r = (f"l{i}_h2", "", "", f"l{i}_r")
            nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [stream, o, gp], [h2, "", "", r],
                                          name=h2, domain="com.microsoft", epsilon=1e-5))
        else:
            r = node("Add", [stream, o], [f"l{i}_r"])
            h2 = norm(r, gp, f"l{i}_h2")
        m = node("MatMul", [node("Sigmoid", [node("MatMul", [h2, f"W1{i}"], [f"l{i}_m1"])], [f"l{i}_m2"]),
                            f"W2{i}"], [f"l{i}_m3"])
        if form == FUSED:
            last = j == len(keep) - 1
            gn = init("g_final", w["final"]) if last else init(f"g_in{keep[j + 1]}", w[f"in{keep[j + 1]}"])
            h, stream = f"l{i}_next", f"l{i}_out"
            outs = [h] if last else [h, "", "", stream]
            nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [r, m, gn], outs, name=h,
                                          domain="com.microsoft", epsilon=1e-5))
        else:
            stream = node("Add", [r, m], [f"l{i}_out"])
    if form == PLAIN:
        h = norm(stream, init("g_final", w["final"]), "final_norm")
    node("MatMul", [h, "ET"], ["logits"])
    n = len(keep)
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "seq", V])]
    for j in range(n):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{j}.{kind}", f32, ["batch", 1, "past", D]))
            outputs.append(helper.make_tensor_value_info(f"present.{j}.{kind}", f32, ["batch", 1, "total", D]))
    # attention_mask is unused by this toy attention; keep it read so it stays an input
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if form == FUSED else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _head_size(folder: str) -> int | None:
    """The head size an export folder's genai_config.json gives (the builder declares the cache's last dim
    symbolic), or None."""
    cfg = os.path.join(folder, "genai_config.json")
    return json.load(open(cfg))["model"]["decoder"]["head_size"] if os.path.exists(cfg) else None


def _prefill_and_decode(sess: ort.InferenceSession, ids: np.ndarray, nxt: np.ndarray,
                        head_size: int | None = None) -> tuple:
    """(prefill outputs, decode-step outputs) of a decoder session: prefill ``ids`` with an empty cache, then
    one step ``nxt`` with the cache the prefill returned. ``head_size``: the cache's last dim where it is
    declared symbolic."""
    names = [o.name for o in sess.get_outputs()]
    batch = ids.shape[0]

    def feed(tokens, past, plen):
        f = {}
        for i in sess.get_inputs():
            if i.name == "input_ids":
                f[i.name] = tokens
            elif i.name == "attention_mask":
                f[i.name] = np.ones((batch, plen + tokens.shape[1]), np.int64)
            elif i.name == "position_ids":
                f[i.name] = np.tile(np.arange(plen, plen + tokens.shape[1]), (batch, 1))
            else:
                f[i.name] = past[i.name]
        return f

    empty = {}
    for i in sess.get_inputs():
        if i.name.startswith("past"):
            dims = [batch if k == 0 else 0 if k == 2 else head_size if k == 3 and isinstance(d, str) else d
                    for k, d in enumerate(i.shape)]
            empty[i.name] = np.zeros(dims, np.float32)
    pre = sess.run(None, feed(ids, empty, 0))
    past = {n.replace("present", "past_key_values"): v for n, v in zip(names, pre) if n.startswith("present")}
    dec = sess.run(None, feed(nxt, past, ids.shape[1]))
    return dict(zip(names, pre)), dict(zip(names, dec))


FORMS = (PLAIN, FUSED)


@pytest.mark.parametrize("form", FORMS)
def test_detects_layers_and_their_caches(form):
    model = synthetic_decoder(form)
    report = find_decoder_layers(model)
    assert report.form == form
    assert [layer.index for layer in report.layers] == list(range(L))
    for layer in report.layers:
        i = layer.index
        assert layer.past == (f"past_key_values.{i}.key", f"past_key_values.{i}.value")
        assert layer.present == (f"present.{i}.key", f"present.{i}.value")
        assert f"l{i}_o" in layer.block.nodes and f"l{i}_m3" in layer.block.nodes
        assert "past_shape" not in layer.block.nodes  # the shared shape reader belongs to no layer
        assert not any(f"l{j}_" in n for n in layer.block.nodes for j in range(L) if j != i and n != layer.block.merge)
    entries = [layer.block.entry for layer in report.layers]
    exits = [layer.block.exit for layer in report.layers]
    assert entries[0] == "emb"
    if form == PLAIN:
        assert entries[1:] == exits[:-1] == [f"l{i}_out" for i in range(L - 1)]
    else:  # the fused stream is output 3 of the closing Skip-norms; the final norm's is unnamed
        assert entries[1:] == exits[:-1]
        assert exits[-1] == "l3_next/residual_sum"
        assert [layer.norm_in for layer in report.layers] == ["l0_in", "l0_next", "l1_next", "l2_next"]
        names = {o for n in expose_residual_sums(model).graph.node for o in n.output}
        assert exits[-1] in names


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("drop", [(0,), (1,), (3,), (1, 2), (0, 3), (0, 1, 2)])
def test_removal_equals_the_decoder_built_without_the_layers(form, drop):
    model = synthetic_decoder(form)
    before = model.SerializeToString()
    pruned = remove_layers(model, drop)
    assert model.SerializeToString() == before  # input untouched
    keep = [i for i in range(L) if i not in drop]
    reference = synthetic_decoder(form, keep)
    report = find_decoder_layers(model)
    ins, outs = expected_interface(model, report, drop)
    assert [v.name for v in pruned.graph.input] == ins == [v.name for v in reference.graph.input]
    assert [v.name for v in pruned.graph.output] == outs == [v.name for v in reference.graph.output]
    assert [v.type for v in pruned.graph.input] == [v.type for v in reference.graph.input]
    rng = np.random.default_rng(1)
    ids, nxt = rng.integers(0, V, (2, 5)), rng.integers(0, V, (2, 1))
    pa, da = _prefill_and_decode(_session(pruned), ids, nxt)
    pb, db = _prefill_and_decode(_session(reference), ids, nxt)
    for name in pb:
        np.testing.assert_allclose(pa[name], pb[name], rtol=1e-5, atol=1e-5, err_msg=f"prefill {name}")
        np.testing.assert_allclose(da[name], db[name], rtol=1e-5, atol=1e-5, err_msg=f"decode {name}")
    full = _prefill_and_decode(_session(model), ids, nxt)[0]["logits"]
    assert np.abs(full - pa["logits"]).max() > 1e-3  # the removal changed something
    assert len(find_decoder_layers(pruned).layers) == len(keep)  # still a decoder, detectable again


@pytest.mark.parametrize("form", FORMS)
def test_refusals(form):
    model = synthetic_decoder(form)
    with pytest.raises(TargetError):
        remove_layers(model, range(L))
    with pytest.raises(InputError, match="no decoder layer 7"):
        remove_layers(model, [7])
    report = find_decoder_layers(model)
    by_block = remove_layers(model, [report.blocks[1]], report=report)  # Blocks, as the pruner holds them
    assert by_block.SerializeToString() == remove_layers(model, [1]).SerializeToString()
    no_cache = onnx.ModelProto()
    no_cache.CopyFrom(model)
    for fld in ("input", "output"):
        keep = [v for v in getattr(no_cache.graph, fld) if "." not in v.name]
        del getattr(no_cache.graph, fld)[:]
        getattr(no_cache.graph, fld).extend(keep)
    assert cache_names(no_cache) is None
    with pytest.raises(InputError, match="no KV cache"):
        find_decoder_layers(no_cache)


def test_update_configs(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "genai_config.json").write_text(json.dumps(
        {"model": {"decoder": {"num_hidden_layers": 4, "num_key_value_heads": 2, "filename": "model.onnx"},
                   "vocab_size": 11}, "search": {"max_length": 4}}))
    (src / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"], "max_window_layers": 3, "hidden_size": 4}))
    written = update_configs(src, dst, [0, 2], 4)
    assert len(written) == 2
    g = json.loads((dst / "genai_config.json").read_text())
    assert g["model"]["decoder"]["num_hidden_layers"] == 2 and g["model"]["decoder"]["num_key_value_heads"] == 2
    c = json.loads((dst / "config.json").read_text())
    assert c["num_hidden_layers"] == 2 and c["layer_types"] == ["a", "c"] and c["max_window_layers"] == 2
    assert c["hidden_size"] == 4


@pytest.mark.parametrize("form", FORMS)
def test_prune_folder(tmp_path, form):
    src = tmp_path / "src"
    src.mkdir()
    model = synthetic_decoder(form)
    onnx.save_model(model, str(src / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    (src / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"num_hidden_layers": L,
                                                                                 "filename": "model.onnx"}}}))
    (src / "tokenizer.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    prune_folder(src, tmp_path / "out", [2])
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    out = tmp_path / "out"
    # tensors under 1 KB stay inline: these toy weights all are
    assert sorted(p.name for p in out.iterdir()) == ["genai_config.json", "model.onnx", "tokenizer.json"]
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == L - 1
    pruned = onnx.load(str(out / "model.onnx"))
    sess = _session(pruned)
    ref = _session(synthetic_decoder(form, [0, 1, 3]))
    feed = dummy_feed(pruned, batch=1, seq=3, vocab=V)
    for a, b in zip(sess.run(None, feed), ref.run(None, feed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="not empty"):
        prune_folder(src, out, [1])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_prune_folder_checks_on_the_runs_providers(tmp_path, monkeypatch):
    """The written folder's check session is the run's (``runtime.using_providers``), not a CPU-only one of its
    own; a failing check leaves no folder."""
    from onnx_consensus import runtime

    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(synthetic_decoder(FORMS[0]), str(src / "model.onnx"))
    seen = []
    real = runtime.ort.InferenceSession

    def recording(source, so=None, providers=None, **kw):
        seen.append((source, providers))
        return real(source, so, providers=providers, **kw)

    monkeypatch.setattr(runtime.ort, "InferenceSession", recording)
    chosen = (("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"}),)
    with runtime.using_providers(chosen):
        prune_folder(src, tmp_path / "out", [1])
    assert len(seen) == 1 and seen[0][1] == list(chosen)  # one check session, on the chosen providers
    folder, name = os.path.split(seen[0][0])  # it ran on the temporary folder, before the rename
    assert name == "model.onnx" and os.path.dirname(folder) == str(tmp_path) and \
        os.path.basename(folder).startswith(".out.")

    def failing(source, so=None, providers=None, **kw):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(runtime.ort, "InferenceSession", failing)
    with pytest.raises(RuntimeError, match="no kernel"):
        prune_folder(src, tmp_path / "out2", [1])
    assert not (tmp_path / "out2").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- real exports (slow)

LLM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "llm")


def _built(name: str, drop: tuple[int, ...]) -> None:
    from tools.data import build_llms

    build_llms.build_model(name)
    hf = build_llms.delete_layers(name, drop)
    for h in (build_llms.CACHE / name / "hf", hf):
        build_llms.export_optimum(h)
        build_llms.export_genai(h)


EXPORTS = [("qwen2", (2,)), ("llama", (1, 3))]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["optimum", "genai"])
@pytest.mark.parametrize("name,drop", EXPORTS)
def test_pruned_export_equals_export_of_the_pruned_pytorch_model(tmp_path, name, drop, kind):
    _built(name, drop)
    src = os.path.join(LLM, name, kind)
    ref = os.path.join(LLM, f"{name}_drop{'-'.join(map(str, drop))}", kind)
    report = prune_folder(src, tmp_path / "out", drop)
    assert report.form == (PLAIN if kind == "optimum" else FUSED)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    a = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), so, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(os.path.join(ref, "model.onnx"), so, providers=["CPUExecutionProvider"])
    assert [i.name for i in a.get_inputs()] == [i.name for i in b.get_inputs()]
    assert [o.name for o in a.get_outputs()] == [o.name for o in b.get_outputs()]
    rng = np.random.default_rng(0)
    ids, nxt = rng.integers(0, 2048, (2, 9)), rng.integers(0, 2048, (2, 1))
    pa, da = _prefill_and_decode(a, ids, nxt, _head_size(src))
    pb, db = _prefill_and_decode(b, ids, nxt, _head_size(ref))
    for n in pb:
        np.testing.assert_allclose(pa[n], pb[n], rtol=1e-4, atol=1e-5, err_msg=f"prefill {n}")
        np.testing.assert_allclose(da[n], db[n], rtol=1e-4, atol=1e-5, err_msg=f"decode {n}")
    for cfg in ("config.json", "genai_config.json"):
        if os.path.exists(os.path.join(ref, cfg)):
            got = json.load(open(tmp_path / "out" / cfg))
            want = json.load(open(os.path.join(ref, cfg)))
            key = ("model", "decoder", "num_hidden_layers") if cfg.startswith("genai") else ("num_hidden_layers",)
            for k in key:
                got, want = got[k], want[k]
            assert got == want


def greedy_onnxruntime(path: str, prompt: list[int], n_new: int) -> list[int]:
    """Greedy generation with the KV cache in onnxruntime: prefill the prompt, then one token per step."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    past = {}
    for i in sess.get_inputs():
        if i.name.startswith("past"):
            past[i.name] = np.zeros([1 if k == 0 else 0 if k == 2 else d for k, d in enumerate(i.shape)], np.float32)
    tokens, step, plen = list(prompt), np.array([prompt], np.int64), 0
    for _ in range(n_new):
        feed = {"input_ids": step, "attention_mask": np.ones((1, plen + step.shape[1]), np.int64), **past}
        if any(i.name == "position_ids" for i in sess.get_inputs()):
            feed["position_ids"] = np.arange(plen, plen + step.shape[1])[None]
        out = dict(zip(names, sess.run(None, feed)))
        plen += step.shape[1]
        nxt = int(out["logits"][0, -1].argmax())
        tokens.append(nxt)
        step = np.array([[nxt]], np.int64)
        past = {n.replace("present", "past_key_values"): v for n, v in out.items() if n.startswith("present")}
    return tokens


@pytest.mark.slow
def test_greedy_generation_with_the_cache_on_the_pruned_optimum_export(tmp_path):
    name, drop = "llama", (1, 3)
    _built(name, drop)
    prune_folder(os.path.join(LLM, name, "optimum"), tmp_path / "out", drop)
    prompt = [5, 17, 300, 42]
    got = greedy_onnxruntime(str(tmp_path / "out" / "model.onnx"), prompt, 12)
    want = greedy_onnxruntime(os.path.join(LLM, "llama_drop1-3", "optimum", "model.onnx"), prompt, 12)
    assert got == want and len(got) == len(prompt) + 12
    # the cache path agrees with recomputing the whole sequence without a cache
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), so, providers=["CPUExecutionProvider"])
    feed = dummy_feed(onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False),
                      seq=len(got) - 1)
    feed["input_ids"] = np.array([got[:-1]], np.int64)
    logits = sess.run(["logits"], feed)[0]
    assert logits[0, len(prompt) - 1:].argmax(-1).tolist() == got[len(prompt):]


@pytest.mark.slow
@pytest.mark.parametrize("name,drop", EXPORTS)
def test_pruned_genai_folder_generates_in_onnxruntime_genai(tmp_path, name, drop):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai wheel not installed")
    _built(name, drop)
    out = tmp_path / "out"
    prune_folder(os.path.join(LLM, name, "genai"), out, drop)
    got = genai_generate(og, out, 20)
    assert len(got) == 20
    assert got == genai_generate(og, os.path.join(LLM, f"{name}_drop{'-'.join(map(str, drop))}", "genai"), 20)
    # the same tokens as the greedy loop of onnxruntime on the pruned optimum export
    prune_folder(os.path.join(LLM, name, "optimum"), tmp_path / "opt", drop)
    assert got == greedy_onnxruntime(str(tmp_path / "opt" / "model.onnx"), [5, 17, 300, 42], 16)


@pytest.mark.slow
@pytest.mark.parametrize("drop", [(0,), (5,), (2, 3), (0, 1, 2, 3, 4)])
def test_both_exports_pruned_alike(tmp_path, drop):
    """First, last, consecutive and all-but-one layers: the two exporters' graphs (decomposed + Add, fused
    Skip-norms) pruned by the two surgery paths still agree with each other, as the whole models do."""
    _built("llama", (1, 3))
    rng = np.random.default_rng(0)
    ids, nxt = rng.integers(0, 2048, (2, 9)), rng.integers(0, 2048, (2, 1))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    res = []
    for kind in ("optimum", "genai"):
        prune_folder(os.path.join(LLM, "llama", kind), tmp_path / kind, drop)
        sess = ort.InferenceSession(str(tmp_path / kind / "model.onnx"), so, providers=["CPUExecutionProvider"])
        res.append(_prefill_and_decode(sess, ids, nxt, _head_size(os.path.join(LLM, "llama", kind))))
    (pa, da), (pb, db) = res
    assert set(pa) == set(pb)
    for n in pb:
        np.testing.assert_allclose(pa[n], pb[n], rtol=1e-4, atol=1e-4, err_msg=f"prefill {n}")
        np.testing.assert_allclose(da[n], db[n], rtol=1e-4, atol=1e-4, err_msg=f"decode {n}")


@pytest.mark.slow
def test_onnxruntime_optimizer_fusion_of_the_optimum_export():
    """A third form: onnxruntime's transformer optimizer fuses the optimum export's Add + RMSNorm into
    Skip-norms but leaves the attention decomposed; pruning it equals the export of the pruned PyTorch model."""
    from onnxruntime.transformers.optimizer import optimize_model

    _built("llama", (1, 3))
    fused = optimize_model(os.path.join(LLM, "llama", "optimum", "model.onnx"), model_type="gpt2", num_heads=4,
                           hidden_size=128, opt_level=1).model
    assert sum(n.op_type == "SkipSimplifiedLayerNormalization" for n in fused.graph.node) == 12
    report = find_decoder_layers(fused)
    assert report.form == FUSED and len(report.layers) == 6
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    pruned = ort.InferenceSession(remove_layers(fused, [1, 3], report=report).SerializeToString(), so,
                                  providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(os.path.join(LLM, "llama_drop1-3", "optimum", "model.onnx"), so,
                               providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ids, nxt = rng.integers(0, 2048, (2, 9)), rng.integers(0, 2048, (2, 1))
    for a, b in zip(_prefill_and_decode(pruned, ids, nxt), _prefill_and_decode(ref, ids, nxt)):
        for n in b:
            np.testing.assert_allclose(a[n], b[n], rtol=1e-4, atol=1e-4, err_msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["optimum", "genai"])
def test_layer_entries_and_exits_are_the_hidden_states_of_pytorch(kind):
    """Each layer's entry and exit, exposed as outputs (fused form: after expose_residual_sums), equal the
    PyTorch model's hidden states before and after that layer (what Block Influence and the instrument read)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _built("llama", (1, 3))
    model = onnx.load(os.path.join(LLM, "llama", kind, "model.onnx"))
    report = find_decoder_layers(model)
    if report.form == FUSED:
        model = expose_residual_sums(model)
    names = list(dict.fromkeys(n for layer in report.layers for n in (layer.block.entry, layer.block.exit)))
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, 2048, (2, 12))
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, dummy_feed(model, batch=2, seq=12) |
                                                                    {"input_ids": ids})))
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(LLM, "llama", "hf"), dtype=torch.float32)
    with torch.no_grad():
        hidden = hf(input_ids=torch.from_numpy(ids), output_hidden_states=True).hidden_states
    n = len(report.layers)
    for layer in report.layers:
        i = layer.index
        np.testing.assert_allclose(got[layer.block.entry], hidden[i].numpy(), rtol=1e-4, atol=1e-4)
        if i < n - 1:
            np.testing.assert_allclose(got[layer.block.exit], hidden[i + 1].numpy(), rtol=1e-4, atol=1e-4)
        else:  # transformers applies the final norm to its last hidden state
            with torch.no_grad():
                normed = hf.model.norm(torch.from_numpy(got[layer.block.exit])).numpy()
            np.testing.assert_allclose(normed, hidden[n].numpy(), rtol=1e-4, atol=1e-4)
