"""Issue 12, failures 5 and 7(a): the feature tensor lies downstream of every block (a classifier head's
input only when the graph ends in one), and fidelity is measured in each output's own terms.

A headless post-LN encoder (models/tiny_transformers.PostLNEncoder without a head: the L2-normalised
mean-pooled embedding, as MiniLM) is the model of the failure: the last Gemm/MatMul lies inside the last
layer's MLP, so with the old feature the last sub-block scored ~0 and went first.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_consensus.cli import main
from onnx_consensus.data import load_calibration
from onnx_consensus.evaluate import Fidelity, compare
from onnx_consensus.graph.blocks import find_blocks
from onnx_consensus.graph.surgery import remove_blocks
from onnx_consensus.kinds.outputs import choose_feature, find_feature_tensor, output_kinds
from onnx_consensus.metrics.features import pool_output
from onnx_consensus.pruner import CriterionOptions, RunOptions, TargetOptions, prune
from onnx_consensus.scoring import score_blocks
from tests.helpers import CACHE, residual_mlp, run
from tests.test_transformers import token_feed, write_token_calib

VOCAB = 50


def encoder_onnx(head: bool, depth: int = 3) -> onnx.ModelProto:
    """A post-LN encoder with a padding mask and random weights: with a classifier head (logits (N, 4)) or
    headless (embedding (N, 32), L2-normalised); cached."""
    torch = pytest.importorskip("torch")
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"feature-postln-{'head' if head else 'embed'}-{depth}.onnx")
    if not os.path.exists(path):
        from models.tiny_transformers import PostLNEncoder, export_onnx

        torch.manual_seed(depth)
        net = PostLNEncoder(vocab=VOCAB, dim=32, heads=4, depth=depth, ff=64, max_len=32,
                            num_classes=4 if head else None)
        tmp = path + f".{os.getpid()}.tmp"
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            export_onnx(net, tmp, seq=12)
        finally:
            torch.set_num_threads(old)
        os.replace(tmp, path)
    return onnx.load(path)


@pytest.fixture(scope="module")
def token_calib(tmp_path_factory):
    # one length: the classic exporter bakes the export's sequence length into the attention reshapes
    return write_token_calib(tmp_path_factory.mktemp("tokens"), "post", lengths=(12, 12, 12))


# ------------------------------------------------------------------------------------ output kinds, feature


def test_kinds_and_feature_headless_encoder():
    model = encoder_onnx(head=False)
    assert output_kinds(model) == {"embedding": "embedding"}
    blocks = find_blocks(model).blocks
    choice = choose_feature(model, blocks)
    assert choice.tensors == ("embedding",) and not choice.head
    assert "no classifier head" in choice.reason
    # the old feature: an input of the last layer's MLP down-projection, upstream of the last block's exit
    old = find_feature_tensor(model)
    assert old != "embedding"
    assert choose_feature(model, blocks, task="classify").tensors == (old,)
    assert output_kinds(model, "classify") == {"embedding": "class scores"}


def test_feature_unchanged_on_classifiers():
    for model in (encoder_onnx(head=True), residual_mlp(4)):
        blocks = find_blocks(model).blocks
        choice = choose_feature(model, blocks)
        assert choice.head and choice.tensors == (find_feature_tensor(model),), choice
        assert "classifier head" in choice.reason
        assert list(output_kinds(model).values()) == ["class scores"]
        # --task embed: the graph output instead
        assert choose_feature(model, blocks, task="embed").tensors == (model.graph.output[0].name,)


def _skip_around_head() -> onnx.ModelProto:
    """x -> MatMul w0 -> h; y = h + MatMul(h, w1) (N, 4): class-score shaped, but the last MatMul is inside
    a residual block, with a skip path around it to the output: no classifier head."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), n) for n in ("w0", "w1")]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]), helper.make_node("MatMul", ["h", "w1"], ["b"]),
             helper.make_node("Relu", ["b"], ["r"]), helper.make_node("Add", ["h", "r"], ["y"])]
    g = helper.make_graph(nodes, "skip", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_skip_path_around_last_weighted_node_is_no_head():
    model = _skip_around_head()
    assert output_kinds(model) == {"y": "embedding"}  # made by Add of two data tensors, not by a head
    choice = choose_feature(model, find_blocks(model).blocks)
    assert choice.tensors == ("y",) and not choice.head


def _map_model() -> onnx.ModelProto:
    """x (N, 2, H, W) -> Conv 1x1 -> Sigmoid: a one-channel score map, as a text detector's."""
    w = numpy_helper.from_array(np.ones((1, 2, 1, 1), np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Sigmoid", ["c"], ["p"])],
                          "map", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, "H", "W"])],
                          [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 1, "H", "W"])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_map_output_is_a_text_map_and_pooled_on_a_grid():
    assert output_kinds(_map_model()) == {"p": "text map"}  # a Sigmoid-made one-channel map (kinds.text)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 1, 9, 10))
    got = pool_output(a)  # 1 channel: 4 x 4 cells, adaptive-average-pool spans
    assert got.shape == (3, 16)
    rows = [(0, 3), (2, 5), (4, 7), (6, 9)]  # floor(i*9/4), ceil((i+1)*9/4)
    cols = [(0, 3), (2, 5), (5, 8), (7, 10)]
    want = np.stack([a[:, 0, r0:r1, c0:c1].mean(axis=(1, 2)) for r0, r1 in rows for c0, c1 in cols], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert pool_output(rng.standard_normal((2, 1, 5, 7))).shape == (2, 16)  # another size, same width
    wide = rng.standard_normal((2, 32, 4, 4))
    np.testing.assert_allclose(pool_output(wide), wide.mean(axis=(2, 3)))  # many channels: as before


# ------------------------------------------------------------------------------------------------ scoring


def test_headless_encoder_scores_are_output_changes(token_calib):
    """Global-scope `cosine` on the graph output equals 1 - mean cosine between the original and the
    block-removed model's embeddings (onnxruntime, whole models); the last layer's sub-blocks no longer
    score ~0 (they do with the old feature, the last MLP's input)."""
    model = encoder_onnx(head=False)
    data = load_calibration(token_calib, model)
    blocks = find_blocks(model).blocks
    assert len(blocks) == 6
    rnd = score_blocks(model, data, blocks=blocks, metrics=("cosine", "cka"), batch_size=24)
    assert rnd.feature == "embedding" and "no classifier head" in rnd.feature_reason
    scores = {b.id: b.scores for b in rnd.blocks}
    ref = np.concatenate([run(model, f)[0] for f in data.batches(24)])
    for b in blocks:
        pruned = remove_blocks(model, [b])
        out = np.concatenate([run(pruned, f)[0] for f in data.batches(24)])
        cos = np.sum(ref * out, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
        assert scores[b.id]["cosine"] == pytest.approx(1 - cos.mean(), rel=1e-4, abs=1e-6), b.id
    last = blocks[-1]  # the last layer's MLP sub-block
    assert scores[last.id]["cosine"] > 1e-3 and scores[last.id]["cka"] > 1e-3
    old = score_blocks(model, data, blocks=blocks, metrics=("cka",), batch_size=24, task="classify")
    assert {b.id: b.scores for b in old.blocks}[last.id]["cka"] < 1e-6  # the failure, with the old feature
    assert old.order[0] == last.id and rnd.order[0] != last.id


def test_classifier_scores_unchanged(token_calib):
    model = encoder_onnx(head=True)
    data = load_calibration(token_calib, model)
    auto = score_blocks(model, data, metrics=("cka", "cosine"), batch_size=24)
    named = score_blocks(model, data, metrics=("cka", "cosine"), batch_size=24, feature=find_feature_tensor(model))
    assert auto.feature == find_feature_tensor(model) and auto.order == named.order
    for a, b in zip(auto.blocks, named.blocks):
        assert a.scores == pytest.approx(b.scores, rel=1e-9)


# ----------------------------------------------------------------------------------------------- fidelity


def test_compare_per_output_kind():
    rng = np.random.default_rng(0)
    emb_ref = rng.standard_normal((20, 8))
    emb = emb_ref + 0.3 * rng.standard_normal((20, 8))
    logits_ref = rng.standard_normal((20, 5))
    logits = logits_ref.copy()
    logits[:4] = -logits[:4]  # 4 of 20 flip their argmax (or stay by chance: counted below)
    seq_ref = rng.standard_normal((20, 6, 3))
    seq = seq_ref + 0.5 * rng.standard_normal((20, 6, 3))
    ref = [{"emb": emb_ref[:12], "logits": logits_ref[:12], "seq": seq_ref[:12]},
           {"emb": emb_ref[12:], "logits": logits_ref[12:], "seq": seq_ref[12:]}]
    out = [{"emb": emb[:12], "logits": logits[:12], "seq": seq[:12]},
           {"emb": emb[12:], "logits": logits[12:], "seq": seq[12:]}]
    kinds = {"emb": "embedding", "logits": "class scores", "seq": "class scores"}
    f = compare(out, ref, np.argmax(logits_ref, 1), kinds=kinds)
    cos = np.sum(emb * emb_ref, 1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(emb_ref, axis=1))
    rel = np.linalg.norm(emb - emb_ref, axis=1) / np.linalg.norm(emb_ref, axis=1)
    assert f.n == 20 and f.kind == "embedding" and f.agreement is None and f.accuracy is None
    assert f.rel_error == pytest.approx(rel.mean())
    by = {o.name: o for o in f.outputs}
    assert by["emb"].cosine == pytest.approx(cos.mean()) and by["emb"].agreement is None
    assert by["logits"].agreement == pytest.approx(np.mean(logits.argmax(1) == logits_ref.argmax(1)))
    assert by["seq"].agreement == pytest.approx(np.mean(seq.argmax(2) == seq_ref.argmax(2)))
    assert f.cosine == pytest.approx(np.mean([o.cosine for o in f.outputs]))
    # since issue 20 the budget reads the head with the lowest value, not the first output's cosine
    lowest = min([("embedding cosine", by["emb"].cosine), ("agreement", by["logits"].agreement),
                  ("agreement", by["seq"].agreement)], key=lambda m: m[1])
    assert f.measure[0] == lowest[0] and f.measure[1] == pytest.approx(lowest[1])
    # the first output is class scores: agreement is the budget's measure, accuracy against labels
    g = compare(out, ref, np.argmax(logits_ref, 1), kinds={"logits": "class scores", "emb": "embedding"})
    assert g.measure == ("agreement", by["logits"].agreement) and g.reference_accuracy == 1.0
    assert g.accuracy == pytest.approx(by["logits"].agreement)
    # arrays without kinds: (N, classes) is class scores, as before
    assert compare(logits, logits_ref).agreement == pytest.approx(by["logits"].agreement)


def test_budget_and_collapse_words():
    emb = Fidelity(10, None, 0.2019, cosine=0.93, kind="embedding")
    assert not emb.meets(0.99) and emb.meets(0.9)
    assert emb.budget_text(0.99) == "cosine 0.9300 < 0.99"  # not "relative error 0.2019 < 0.99"
    assert Fidelity(10, None, 0.5, cosine=0.5, kind="embedding").collapse() == "embedding cosine 0.5000 < 0.9"
    assert emb.collapse() is None
    cls = Fidelity(10, 0.3, 0.9, cosine=0.2, kind="class scores")
    assert cls.budget_text(0.99) == "agreement 0.3000 < 0.99" and cls.collapse().startswith("top-1 agreement 0.3")
    assert Fidelity(10, 0.8, 0.9, cosine=0.2, kind="class scores").collapse() is None  # agreement decides


# ------------------------------------------------------------------------------------------ end to end


def test_prune_headless_budget_in_cosine(token_calib):
    model = encoder_onnx(head=False)
    data = load_calibration(token_calib, model)
    res = prune(model, data, criterion=CriterionOptions(metrics=("cka", "cosine")),
                target=TargetOptions(min_agreement=0.999999), run=RunOptions(batch_size=24))
    assert res.removals == [] and "cosine" in res.stop_reason and "relative error" not in res.stop_reason
    assert res.fidelity.agreement is None and res.fidelity.cosine == pytest.approx(1.0)
    assert res.collapse is None  # no explicit target


def test_cli_summary_in_output_terms(token_calib, tmp_path, capsys):
    src = tmp_path / "embed.onnx"
    onnx.save(encoder_onnx(head=False), src)
    # one-shot: the summary's terms do not depend on the schedule (five iterative rounds cost 5x the CPU)
    code = main(["prune", str(src), str(tmp_path / "out.onnx"), "--calib", token_calib, "--remove", "5",
                 "--keep-per-stage", "0", "--metrics", "cka", "--schedule", "one-shot", "--batch-size", "24",
                 "--no-latency", "-q", "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Feature tensor: embedding (graph output; no classifier head" in out
    assert "embedding cosine" in out and "top-1 agreement" not in out
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["feature"]["tensor"] == "embedding" and report["fidelity"]["agreement"] is None
    cos = report["fidelity"]["cosine"]
    if cos < 0.9:  # five of six sub-blocks gone: the embedding collapses, and the summary says so
        assert "Warning: the pruned model's outputs collapsed (embedding cosine" in out and "--finetune-epochs" in out
        assert report["collapse"]
    code = main(["inspect", str(src)])
    out = capsys.readouterr().out
    assert "Feature tensor (global scope): embedding" in out and "Outputs: embedding (embedding)" in out
