"""Transformers: candidate detection (pre-LN / post-LN, masks, both torch exporters, decomposed norms, random
names), removal at two sequence lengths, exact removal of a zeroed pre-LN sub-block, a zeroed post-LN layer
ranked first, KV-cache refusal, fused-op reporting, and the bridge fine-tuning the pruned models.

Exports are cached under .cache/test-models (a cold run takes longer: the dynamo exporter needs seconds).
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_consensus.cli import main
from onnx_consensus.data import load_calibration
from onnx_consensus.graph.blocks import find_blocks
from onnx_consensus.graph.ir import interface
from onnx_consensus.graph.surgery import remove_blocks
from onnx_consensus.pruner import CriterionOptions, RunOptions, TargetOptions, prune
from onnx_consensus.scoring import score_blocks
from tests.helpers import CACHE, randomize_names, run

VOCAB = 50


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    torch = pytest.importorskip("torch")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _net(kind: str, depth: int, zero: str | None):
    import torch

    from models import tiny_transformers as tt

    torch.manual_seed(depth)
    if kind == "vit":
        net = tt.TinyViT(patch=7, dim=32, depth=depth, heads=4, layer_scale=None)
    elif kind in ("post", "post-nomask"):
        net = tt.PostLNEncoder(vocab=VOCAB, dim=32, heads=4, depth=depth, ff=64, max_len=32,
                               use_mask=kind == "post")
    elif kind == "dec":
        net = tt.PreLNDecoder(vocab=VOCAB, dim=32, heads=4, depth=depth, max_len=32)
    else:
        raise KeyError(kind)
    with torch.no_grad():
        if zero is not None:  # "attn1": attention output projection of layer 1; "mlp0"; "layer1" (post-LN)
            what, layer = zero[:-1], int(zero[-1])
            if kind in ("vit", "dec"):
                blk = net.blocks[layer]
                lin = blk.attn.proj if what == "attn" else blk.mlp[2]
                lins = [lin]
            else:
                lay = net.encoder.layers[layer]
                lins = [lay.self_attn.out_proj, lay.linear2]
            for lin in lins:
                lin.weight.zero_()
                lin.bias.zero_()
    return net


def tx_onnx(kind: str, depth: int = 2, exporter: str = "classic", *, opset: int | None = None,
            zero: str | None = None) -> onnx.ModelProto:
    """A small transformer ('vit', 'post' (padding mask), 'post-nomask', 'dec' (causal mask)) with random
    weights, exported by torch's classic or dynamo exporter; cached."""
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"tx-{kind}-{depth}-{exporter}-{opset}-{zero}.onnx")
    if not os.path.exists(path):
        from models.tiny_transformers import export_onnx

        tmp = path + f".{os.getpid()}.tmp"
        export_onnx(_net(kind, depth, zero), tmp, dynamo=exporter == "dynamo", opset=opset, seq=12)
        os.replace(tmp, path)
    return onnx.load(path)


def token_feed(kind: str, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {"input_ids": rng.integers(0, VOCAB, (batch, seq)).astype(np.int64)}
    if kind == "post":
        lengths = rng.integers(max(2, seq // 2), seq + 1, batch)
        lengths[0] = seq
        feed["padding_mask"] = np.arange(seq)[None, :] >= lengths[:, None]
    return feed


def write_token_calib(path, kind: str, lengths=(8, 12, 16), per_file: int = 24) -> str:
    """npz files of variable sequence length, one with int32 ids (the model declares int64)."""
    os.makedirs(path, exist_ok=True)
    for f, seq in enumerate(lengths):
        feed = token_feed(kind, per_file, seq, seed=f)
        if f == 1:
            feed["input_ids"] = feed["input_ids"].astype(np.int32)
        np.savez(os.path.join(path, f"part{f}.npz"), **feed)
    return str(path)


def write_image_calib(path, n: int = 96) -> str:
    os.makedirs(path, exist_ok=True)
    np.save(os.path.join(path, "calib.npy"), np.random.default_rng(0).standard_normal((n, 1, 28, 28)).astype(np.float32))
    return str(path)


def _ops(model):
    return {n.output[0]: n.op_type for n in model.graph.node}


# --------------------------------------------------------------------------------------------- detection

CASES = [(k, d, e) for k in ("vit", "post", "post-nomask", "dec") for d in (2, 3) for e in ("classic", "dynamo")]
# Dynamo exports nothing else in the default run uses (seconds each on a cold cache), whose depth-3 case has the
# same structure and assertions: under -m slow.
_SLOW = {("vit", 2, "dynamo"), ("post-nomask", 2, "dynamo")}


@pytest.mark.parametrize("kind,depth,exporter", [
    pytest.param(*c, id=f"{c[0]}-{c[1]}-{c[2]}", marks=[pytest.mark.slow] if c in _SLOW else []) for c in CASES])
def test_candidate_counts_random_names(kind, depth, exporter):
    model = randomize_names(tx_onnx(kind, depth, exporter), seed=depth)
    ops = _ops(model)
    blocks = find_blocks(model).blocks
    layers = find_blocks(model, unit="layer").blocks
    assert len(blocks) == 2 * depth
    assert len(layers) == depth
    # sub-blocks alternate attention / MLP; each layer holds one attention and chains to the next layer
    assert [any(ops[k] == "Softmax" for k in b.nodes) for b in blocks] == [True, False] * depth
    for a, b in zip(layers, layers[1:]):
        assert b.entry == a.exit
    for layer in layers:
        assert sum(ops[k] == "Softmax" for k in layer.nodes) == 1
    if kind in ("post", "dec"):  # the mask reaches the attention sub-blocks as a side input, not an entry
        assert all(b.side_inputs for b in blocks[::2])
    if kind.startswith("post"):  # post-LN: every candidate ends at a LayerNormalization output
        assert all(ops[b.exit] == "LayerNormalization" for b in blocks + layers)
    else:  # pre-LN: the final norm stays outside
        assert all(ops[b.exit] == "Add" for b in blocks + layers)


@pytest.mark.parametrize("kind", ["post", "vit"])
def test_decomposed_layernorm(kind):
    """Opset 14: LayerNorm exported as ReduceMean/Sub/Pow/Add/Sqrt/Div/Mul/Add; post-LN layers still found."""
    model = randomize_names(tx_onnx(kind, 3, "classic", opset=14), seed=1, keep_io=True)
    ops = _ops(model)
    assert "LayerNormalization" not in ops.values()
    blocks, layers = find_blocks(model).blocks, find_blocks(model, unit="layer").blocks
    assert (len(blocks), len(layers)) == (6, 3)
    if kind == "post":  # the decomposed norm after each merge belongs to the block
        assert all("Sqrt" in {ops[k] for k in b.nodes[-10:]} for b in blocks)
        model2 = remove_blocks(model, [layers[1]])
        feed = token_feed("post", 2, 12)
        assert run(model2, feed)[0].shape == (2, 4)


# --------------------------------------------------------------------------------------------- removal

@pytest.mark.parametrize("kind", ["post", "post-nomask", "dec"])
@pytest.mark.parametrize("unit", ["block", "layer"])
def test_removal_keeps_interface_two_lengths(kind, unit):
    model = tx_onnx(kind, 3, "dynamo")
    blocks = find_blocks(model, unit=unit).blocks
    pruned = remove_blocks(model, [blocks[0], blocks[-1]])
    assert interface(pruned) == interface(model)
    assert len(pruned.graph.node) < len(model.graph.node)
    onnx.checker.check_model(pruned, full_check=True)
    for batch, seq in ((2, 8), (3, 13)):
        out = run(pruned, token_feed(kind, batch, seq))[0]
        assert out.shape == ((batch, seq, VOCAB) if kind == "dec" else (batch, 4))
        assert np.isfinite(out).all()


def test_vit_removal_dynamic_batch():
    model = tx_onnx("vit", 3, "classic")
    pruned = remove_blocks(model, find_blocks(model, unit="layer").blocks[1:2])
    assert interface(pruned) == interface(model)
    for n in (1, 5):
        assert run(pruned, {"image": np.zeros((n, 1, 28, 28), np.float32)})[0].shape == (n, 10)


@pytest.mark.parametrize("kind,zero,exporter", [("vit", "attn1", "classic"), ("dec", "mlp0", "dynamo")])
def test_zeroed_preln_subblock_removed_exactly(tmp_path, kind, zero, exporter):
    model = randomize_names(tx_onnx(kind, 3, exporter, zero=zero), seed=3, keep_io=True)
    # The decoder's output is (N, T, vocab): the hold-out fidelity check (evaluate.py) concatenates outputs
    # across batches, so its calibration files share one length here (scoring itself pools over tokens).
    calib = write_image_calib(tmp_path / "c") if kind == "vit" else write_token_calib(tmp_path / "c", kind, (12, 12))
    data = load_calibration(calib, model)
    result = prune(model, data, target=TargetOptions(remove=1), run=RunOptions(batch_size=32))
    blocks = find_blocks(model).blocks
    layer = int(zero[-1])
    expected = blocks[2 * layer + (zero.startswith("mlp"))]
    assert result.removed_ids == [expected.id]
    feeds = [{"image": np.random.default_rng(1).standard_normal((4, 1, 28, 28)).astype(np.float32)}] if kind == "vit" \
        else [token_feed(kind, 2, 9), token_feed(kind, 3, 15)]
    for feed in feeds:
        np.testing.assert_allclose(run(result.model, feed)[0], run(model, feed)[0], atol=1e-5, rtol=1e-5)


def test_postln_zeroed_layer_ranked_first(tmp_path):
    """A post-LN layer cannot be removed exactly (its LayerNorms stay in the path): the tool ranks a layer
    whose attention and MLP output projections are zero first, and removing it changes outputs little."""
    model = randomize_names(tx_onnx("post", 3, "dynamo", zero="layer1"), seed=5, keep_io=True)
    data = load_calibration(write_token_calib(tmp_path / "c", "post"), model)
    layers = find_blocks(model, unit="layer").blocks
    rnd = score_blocks(model, data, blocks=layers, batch_size=32)
    assert rnd.order[0] == layers[1].id
    result = prune(model, data, criterion=CriterionOptions(unit="layer"), target=TargetOptions(remove=1),
                   run=RunOptions(batch_size=32))
    assert result.removed_ids == [layers[1].id]
    assert result.fidelity.agreement >= 0.95


def test_cli_unit_layer(tmp_path, capsys):
    path = tmp_path / "post.onnx"
    onnx.save(tx_onnx("post", 3, "dynamo"), path)
    assert main(["inspect", str(path), "--unit", "layer", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unit"] == "layer" and len(out["blocks"]) == 3
    calib = write_token_calib(tmp_path / "c", "post")
    dst = tmp_path / "out.onnx"
    code = main(["prune", str(path), str(dst), "--calib", calib, "--unit", "layer", "--remove", "1",
                 "--no-latency", "-q", "--metrics", "cka,cosine", "--report", str(tmp_path / "r.json")])
    assert code == 0
    pruned = onnx.load(dst)
    assert interface(pruned) == interface(onnx.load(path))
    assert len(find_blocks(pruned, unit="layer").blocks) == 2


# --------------------------------------------------------------------------------------------- refusals

def _kv_model(named: bool) -> onnx.ModelProto:
    """x (B,T,8) -> x + MatMul(x) ; present = Concat(past, x) along T (a KV-cache append)."""
    past, present = ("past_key", "present_key") if named else ("a", "b")
    w = numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["x", "h"], ["y"]),
             helper.make_node("Concat", [past, "x"], [present], axis=1)]
    g = helper.make_graph(nodes, "kv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", 8]),
                                        helper.make_tensor_value_info(past, TensorProto.FLOAT, ["B", "P", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", 8]),
                           helper.make_tensor_value_info(present, TensorProto.FLOAT, ["B", "Q", 8])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("named", [True, False])
def test_kv_cache_model_left_alone(named, tmp_path, capsys):
    model = _kv_model(named)
    report = find_blocks(model)
    assert report.blocks == [] and "KV cache" in report.refusal
    path = tmp_path / "kv.onnx"
    onnx.save(model, path)
    assert main(["inspect", str(path)]) == 0
    assert "KV cache" in capsys.readouterr().out


def test_fused_skip_layernorm_reported():
    """onnxruntime's transformer optimizer fuses the residual merge into SkipLayerNormalization: seen,
    reported as not removable, with the reason; a plain residual elsewhere is still a candidate."""
    d = 8
    inits = [numpy_helper.from_array(np.eye(d, dtype=np.float32), "w"),
             numpy_helper.from_array(np.ones(d, np.float32), "g"), numpy_helper.from_array(np.zeros(d, np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("SkipLayerNormalization", ["h", "x", "g", "b"], ["s"], domain="com.microsoft", epsilon=1e-5),
             helper.make_node("MatMul", ["s", "w"], ["h2"]), helper.make_node("Add", ["s", "h2"], ["y"])]
    g = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", d])], inits,
                          value_info=[helper.make_tensor_value_info("s", TensorProto.FLOAT, ["B", "T", d])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    report = find_blocks(model)
    assert [b.exit for b in report.blocks] == ["y"]
    fused = [n for n in report.not_removable if "SkipLayerNormalization" in n.reason]
    assert len(fused) == 1 and "fused" in fused[0].reason
    assert any("SkipLayerNormalization" in note for note in report.notes)


def test_opset23_attention_op_in_branch():
    """The opset-23 Attention op inside a pre-LN sub-block: detected and removable like a MatMul chain."""
    d, heads = 8, 2
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32) * 0.3, n) for n in ("wq", "wk", "wv", "wo")]
    inits += [numpy_helper.from_array(np.ones(d, np.float32), "g"), numpy_helper.from_array(np.zeros(d, np.float32), "b")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "wq"], ["q"]), helper.make_node("MatMul", ["n", "wk"], ["k"]),
             helper.make_node("MatMul", ["n", "wv"], ["v"]),
             helper.make_node("Attention", ["q", "k", "v"], ["a"], q_num_heads=heads, kv_num_heads=heads),
             helper.make_node("MatMul", ["a", "wo"], ["o"]), helper.make_node("Add", ["x", "o"], ["r"]),
             helper.make_node("LayerNormalization", ["r", "g", "b"], ["y"], axis=-1)]
    g = helper.make_graph(nodes, "attn23", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", d])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    blocks = find_blocks(model).blocks
    assert [b.exit for b in blocks] == ["r"] and "a" in blocks[0].nodes
    assert [b.exit for b in find_blocks(model, unit="layer").blocks] == ["r"]  # nothing to pair it with
    pruned = remove_blocks(model, blocks)
    assert "Attention" not in {n.op_type for n in pruned.graph.node}
    x = rng.standard_normal((2, 5, d)).astype(np.float32)

    def ln(t):
        return (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-5)

    # the pruned model has no Attention node left: any onnxruntime must run it (a failure is a surgery bug)
    np.testing.assert_allclose(run(pruned, {"x": x})[0], ln(x), atol=1e-5)  # without the sub-block: y = LN(x)
    w = {t.name: numpy_helper.to_array(t) for t in inits}
    n = ln(x)
    q, k, v = ((n @ w[name]).reshape(2, 5, heads, d // heads).transpose(0, 2, 1, 3) for name in ("wq", "wk", "wv"))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    a = ((p / p.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(2, 5, d)
    try:
        y = run(model, {"x": x})[0]
    except Exception as exc:  # only the unpruned model has the op; the pruned model was checked above
        if "Attention" not in str(exc):
            raise
        pytest.skip(f"this onnxruntime cannot run Attention-23 (the pruned model passed): {exc}")
    np.testing.assert_allclose(y, ln(x + a @ w["wo"]), atol=1e-4)  # and the unpruned model is what we think


# --------------------------------------------------------------------------------------------- bridge

@pytest.mark.parametrize("kind,exporter", [("vit", "classic"), ("post", "dynamo"), ("dec", "dynamo")])
def test_bridge_finetunes_pruned_transformer(tmp_path, kind, exporter):
    from onnx_consensus.finetune.epochs import training_batches
    from onnx_consensus.finetune.train import finetune
    from onnx_consensus.options import FinetuneConfig

    model = tx_onnx(kind, 2, exporter)
    pruned = remove_blocks(model, find_blocks(model, unit="layer").blocks[:1])
    calib = write_image_calib(tmp_path / "c", 32) if kind == "vit" else write_token_calib(tmp_path / "c", kind, (8, 10), 16)
    data = load_calibration(calib, model)
    config = FinetuneConfig(epochs=1, optimizer="adamw", lr=1e-3, max_steps=2, threads=1)
    tuned, res = finetune(pruned, training_batches(data, 16), teacher=model, config=config, progress=False)
    assert res.mode == "distillation" and res.history[0]["images"] > 0 and np.isfinite(res.history[0]["loss"])
    before = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in tuned.graph.initializer}
    assert before.keys() == after.keys()
    assert any(not np.array_equal(before[k], after[k]) for k in before if before[k].dtype == np.float32)
    assert interface(tuned) == interface(pruned)
    feed = {"image": np.zeros((2, 1, 28, 28), np.float32)} if kind == "vit" else token_feed(kind, 2, 11)
    assert np.isfinite(run(tuned, feed)[0]).all()


def test_token_pooling_mask_conventions():
    """Token features average the kept tokens: a "keep" mask (1 = keep, HF) and a "pad" mask (True = pad,
    torch) give the same pooling; ids (not 0/1) are never a mask. The exported padding_mask is read from the
    graph as "pad", whatever its name."""
    from onnx_consensus.graph.masks import TokenMask, token_masks
    from onnx_consensus.metrics.features import pool_features
    from onnx_consensus.scoring import token_keep as _mask_for

    act = np.zeros((2, 4, 3), np.float32)
    act[:, :2] = 1.0  # real tokens hold 1, padding holds 0
    keep = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], np.int64)
    for polarity, value in (("keep", keep), ("pad", keep == 0), ("pad", (keep == 0).astype(np.int64))):
        masks = {"m": TokenMask("m", polarity, "override")}
        np.testing.assert_allclose(pool_features(act, _mask_for({"m": value}, act, masks)), np.ones((2, 3)))
    assert _mask_for({"m": keep * 7}, act, {"m": TokenMask("m", "keep", "override")}) is None
    for model in (tx_onnx("post", 2, "classic"), randomize_names(tx_onnx("post", 2, "dynamo"), keep_io=False)):
        (name, mask), = token_masks(model).items()
        assert (mask.polarity, mask.source) == ("pad", "structure")


def test_onnxruntime_optimized_export_reported():
    """A real onnxruntime transformer-optimizer output (BERT fusion of the post-LN encoder): every residual
    merge became SkipLayerNormalization; each is reported with its reason, none is offered for removal."""
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer")
    model = tx_onnx("post", 2, "classic")
    fused = optimizer.optimize_model(model, model_type="bert", num_heads=4, hidden_size=32, opt_level=1).model
    if not any(n.op_type == "SkipLayerNormalization" for n in fused.graph.node):
        pytest.skip("this onnxruntime did not fuse SkipLayerNormalization")
    report = find_blocks(fused)
    assert report.blocks == []
    n_skip = sum(n.op_type == "SkipLayerNormalization" for n in fused.graph.node)
    assert sum("SkipLayerNormalization" in r.reason for r in report.not_removable) == n_skip
    assert any("SkipLayerNormalization" in note for note in report.notes)


def test_shipped_transformer_models():
    """The trained reference transformers: candidate counts, and the token encoder's calibration set (variable
    lengths, bool padding mask) loads and scores."""
    root = os.path.join(os.path.dirname(__file__), "..")
    vit = onnx.load(os.path.join(root, "models", "vit_fmnist.onnx"))
    assert (len(find_blocks(vit).blocks), len(find_blocks(vit, unit="layer").blocks)) == (12, 6)
    enc = onnx.load(os.path.join(root, "models", "postln_fmnist_tokens.onnx"))
    assert (len(find_blocks(enc).blocks), len(find_blocks(enc, unit="layer").blocks)) == (8, 4)
    dec = onnx.load(os.path.join(root, "models", "decoder_fmnist_tokens.onnx"))
    assert (len(find_blocks(dec).blocks), len(find_blocks(dec, unit="layer").blocks)) == (8, 4)
    data = load_calibration(os.path.join(root, "examples", "fmnist_tokens"), enc, max_samples=96)
    rnd = score_blocks(enc, data, blocks=find_blocks(enc, unit="layer").blocks, metrics=("cka", "cosine"), batch_size=48)
    assert len(rnd.order) == 4 and rnd.n_samples == 96
