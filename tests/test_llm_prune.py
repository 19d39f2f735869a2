"""Decoder-LLM pruning end to end (issue 14): text calibration, layer scoring, the CLI on export folders and
model files, perplexity, the interface-change report. Fast tests use the synthetic decoders of
test_decoder_llm.py with a tiny word-level tokenizer; slow ones the real exports of tools/data/build_llms.py."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import onnx
import pytest

from onnx_consensus.cli import main
from onnx_consensus.errors import InputError
from onnx_consensus.graph.decoder import FUSED, PLAIN, expose_residual_sums, find_decoder_layers, prefill_feed
from onnx_consensus.graph.kv_surgery import remove_layers
from onnx_consensus.llm.perplexity import log_likelihood, perplexity
from onnx_consensus.llm.scoring import final_hidden, score_layers
from onnx_consensus.llm.text import load_text
from onnx_consensus.runtime import make_session
from tests.helpers import genai_generate
from tests.test_decoder_llm import LLM, V, _built, greedy_onnxruntime, synthetic_decoder

FORMS = [PLAIN, FUSED]
WORDS = [f"w{i}" for i in range(V - 1)]


def _tokenizer(path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def _text(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words))


@pytest.fixture
def folder(tmp_path, request):
    form = getattr(request, "param", PLAIN)
    src = tmp_path / f"src_{form}"
    src.mkdir()
    onnx.save_model(synthetic_decoder(form), str(src / "model.onnx"))
    _tokenizer(src / "tokenizer.json")
    (src / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    (tmp_path / "calib.txt").write_text(_text(400))
    return src


def test_text_windows_jsonl_and_folder(tmp_path):
    tok = _tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("w1 w2 w3 w4 w5")
    (tmp_path / "t" / "b.jsonl").write_text(json.dumps({"text": "w6 w7"}) + "\n\n" + json.dumps("w8 w9 w1") + "\n")
    (tmp_path / "t" / "skip.bin").write_text("w1")
    d = load_text(tmp_path / "t", tok, seq_len=4)
    assert d.n_tokens == 10 and d.windows.tolist() == [[2, 3, 4, 5], [6, 7, 8, 9]]
    score, hold = d.split_windows(0.5)
    assert len(score) == 1 and len(hold) == 1 and sorted(score.tolist() + hold.tolist()) == d.windows.tolist()
    with pytest.raises(InputError, match="fewer than one window"):
        load_text(tmp_path / "t" / "a.txt", tok, seq_len=16)
    (tmp_path / "bad.jsonl").write_text("{\"x\": 1}\n")
    with pytest.raises(InputError, match="bad.jsonl:1"):
        load_text(tmp_path / "bad.jsonl", tok)


def test_perplexity_closed_form():
    """Uniform logits: perplexity = vocabulary size; log_likelihood matches a direct softmax."""
    logits = np.zeros((2, 5, 7), np.float32)
    ids = np.random.default_rng(0).integers(0, 7, (2, 5))
    ll, n = log_likelihood(logits, ids)
    assert n == 8 and math.isclose(math.exp(-ll / n), 7.0, rel_tol=1e-12)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 4, 7))
    ll, _ = log_likelihood(logits, ids[:1, :4])
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert math.isclose(ll, sum(math.log(p[0, t, ids[0, t + 1]]) for t in range(3)), rel_tol=1e-9)


@pytest.mark.parametrize("form", FORMS)
def test_perplexity_of_a_model_matches_its_logits(form):
    model = synthetic_decoder(form)
    ids = np.random.default_rng(0).integers(0, V, (3, 6))
    logits = make_session(model).run(["logits"], prefill_feed(model, ids))[0]
    ll, n = log_likelihood(logits, ids)
    assert math.isclose(perplexity(model, ids, batch_size=2), math.exp(-ll / n), rel_tol=1e-6)


@pytest.mark.parametrize("form", FORMS)
def test_scores_are_the_damage_of_removing_each_layer(form):
    """Global scope, cosine: 1 - mean cosine between the final hidden state with and without the layer,
    recomputed here from the model pruned by hand; local scope, cosine: between each layer's entry and exit."""
    model = synthetic_decoder(form)
    work = expose_residual_sums(model) if form == FUSED else model
    report = find_decoder_layers(work)
    ids = np.random.default_rng(0).integers(0, V, (4, 5))
    feat = final_hidden(work)
    r = score_layers(work, report, ids, removed=[1], metrics=("cosine",), scope="global")
    assert len(r.blocks) == 3 and report.by_index()[1].block.id not in r.order

    exposed = onnx.ModelProto()
    exposed.CopyFrom(work)
    exposed.graph.output.append(onnx.helper.make_empty_tensor_value_info(feat))

    def hidden(layers):
        m = remove_layers(exposed, layers, report=report)
        a = make_session(m).run([feat], prefill_feed(m, ids))[0]
        return a.reshape(-1, a.shape[-1]).astype(np.float64)

    x = hidden([1])
    for b in r.blocks:
        i = report.by_id()[b.id].index
        y = hidden([1, i])
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        assert math.isclose(b.scores["cosine"], 1 - cos.mean(), rel_tol=1e-5, abs_tol=1e-7)
    assert [b.scores["cosine"] for b in r.blocks] == sorted(b.scores["cosine"] for b in r.blocks)
    loc = score_layers(work, report, ids, metrics=("cosine", "cka"), scope="local")
    assert len(loc.blocks) == 4 and all(set(b.scores) == {"cosine", "cka"} for b in loc.blocks)


@pytest.mark.parametrize("folder", FORMS, indirect=True)
def test_cli_prunes_an_export_folder(folder, tmp_path, capsys):
    out = tmp_path / "out"
    rep = tmp_path / "r.json"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    code = main([str(folder), str(out), "--calib", str(tmp_path / "calib.txt"), "--seq-len", "8", "--remove", "2",
                 "--metrics", "cosine,cka", "--report", str(rep), "-q", "--latency-runs", "2"])
    assert code == 0
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    text = capsys.readouterr().out
    assert "Interface change: 4 -> 2 KV-cache layers" in text and "past_key_values.3.key" in text
    r = json.loads(rep.read_text())
    removed = [x["index"] for x in r["removed"]]
    assert len(removed) == 2 and r["interface"]["removed_inputs"] == [
        "past_key_values.2.key", "past_key_values.2.value", "past_key_values.3.key", "past_key_values.3.value"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert (out / "tokenizer.json").exists()
    # the written model equals the synthetic decoder built without those layers
    pruned = onnx.load(str(out / "model.onnx"))
    ref = synthetic_decoder(folder.name.split("_")[1], [i for i in range(4) if i not in removed])
    ids = np.random.default_rng(3).integers(0, V, (2, 6))
    got = make_session(pruned).run(["logits"], prefill_feed(pruned, ids))[0]
    want = make_session(ref).run(["logits"], prefill_feed(ref, ids))[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    hold = r["perplexity"]["holdout"]
    assert hold["before"] > 1 and hold["after"] > 1 and len(r["rounds"]) == 2


def test_cli_model_file_and_errors(folder, tmp_path, capsys):
    calib = str(tmp_path / "calib.txt")
    out = tmp_path / "p.onnx"
    assert main([str(folder / "model.onnx"), str(out), "--calib", calib, "--seq-len", "8", "--remove", "1",
                 "--metrics", "cosine", "--scope", "local", "--no-latency", "-q"]) == 0
    m = onnx.load(str(out))
    assert [i.name for i in m.graph.input][-2:] == ["past_key_values.2.key", "past_key_values.2.value"]
    capsys.readouterr()
    assert main([str(folder), str(tmp_path / "o2"), "--calib", calib, "--seq-len", "8", "-q"]) == 2
    assert "--remove N" in capsys.readouterr().err
    assert main([str(folder), str(tmp_path / "o3"), "--calib", calib, "--remove", "4", "-q"]) == 3
    assert main([str(folder), str(tmp_path / "o4"), "--calib", str(tmp_path / "none.txt"), "--remove", "1"]) == 2
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


# ---------------------------------------------------------------- real exports (slow)

@pytest.mark.slow
def test_cli_prunes_the_optimum_export_and_it_generates_with_the_cache(tmp_path):
    _built("llama", (1, 3))
    out = tmp_path / "opt"
    rep = tmp_path / "r.json"
    assert main([os.path.join(LLM, "llama", "optimum"), str(out), "--calib", os.path.join(LLM, "text", "calib.txt"),
                 "--remove", "2", "--metrics", "cosine", "--report", str(rep), "--no-latency", "-q",
                 "--threads", "1"]) == 0
    r = json.loads(rep.read_text())
    removed = sorted(x["index"] for x in r["removed"])
    assert len(r["interface"]["removed_inputs"]) == 4
    tokens = greedy_onnxruntime(str(out / "model.onnx"), [5, 17, 300, 42], 8)
    assert len(tokens) == 12
    if removed == [1, 3]:  # the reference export with those layers deleted in PyTorch
        assert tokens == greedy_onnxruntime(os.path.join(LLM, "llama_drop1-3", "optimum", "model.onnx"),
                                            [5, 17, 300, 42], 8)
    assert r["perplexity"]["holdout"]["after"] < 5 * r["perplexity"]["holdout"]["before"]


@pytest.mark.slow
def test_cli_prunes_the_genai_export_and_it_generates_in_onnxruntime_genai(tmp_path, capsys):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai wheel not installed")
    _built("llama", (1, 3))
    out = tmp_path / "gen"
    assert main([os.path.join(LLM, "llama", "genai"), str(out), "--calib", os.path.join(LLM, "text", "calib.txt"),
                 "--remove", "2", "--metrics", "cosine", "--scope", "local", "--no-latency", "-q",
                 "--threads", "1"]) == 0
    assert "Interface change: 6 -> 4 KV-cache layers" in capsys.readouterr().out
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == 4
    assert len(genai_generate(og, out, 16)) == 16
    # fine-tuning the fused export: one line naming the operators the bridge cannot train, exit 4
    code = main([os.path.join(LLM, "llama", "genai"), str(tmp_path / "gen2"), "--calib",
                 os.path.join(LLM, "text", "calib.txt"), "--remove", "1", "--metrics", "cosine", "--scope", "local",
                 "--no-latency", "-q", "--finetune-epochs", "1", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 4 and "GroupQueryAttention" in err and (tmp_path / "gen2" / "model.onnx").exists()


@pytest.mark.parametrize("folder", FORMS, indirect=True)
def test_finetune_by_distillation(folder, tmp_path):
    """Both synthetic forms train through the bridge (it has SkipSimplifiedLayerNormalization; the real
    genai export's GroupQueryAttention it has not: see the slow genai test)."""
    pytest.importorskip("torch")
    out = tmp_path / "out"
    rep = tmp_path / "r.json"
    code = main([str(folder), str(out), "--calib", str(tmp_path / "calib.txt"), "--seq-len", "8", "--remove", "1",
                 "--metrics", "cosine", "--scope", "local", "--no-latency", "-q", "--report", str(rep),
                 "--finetune-epochs", "2", "--ft-batch-size", "8", "--lr", "0.003"])
    r = json.loads(rep.read_text())
    ft = r["finetune"]
    assert code == 0 and "error" not in ft and len(ft["history"]) == 2
    # the best of (not fine-tuned, each epoch) by held-out perplexity is kept: never worse
    assert ft["perplexity_after"] <= ft["perplexity_before"] + 1e-9
    assert math.isclose(r["perplexity"]["finetuned"]["after"], ft["perplexity_after"], rel_tol=1e-9)
    pruned = onnx.load(str(out / "model.onnx"))
    # the written model is the one kept: its perplexity on the held-back windows is the reported one
    _, hold = load_text(tmp_path / "calib.txt", folder / "tokenizer.json", seq_len=8).split_windows(0.2, 0)
    assert math.isclose(perplexity(pruned, hold), r["perplexity"]["finetuned"]["after"], rel_tol=1e-5)
    assert len(pruned.graph.input) == 2 + 2 * 3


def test_plan_replay_and_exclude(folder, tmp_path):
    calib = str(tmp_path / "calib.txt")
    common = ["--calib", calib, "--seq-len", "8", "--metrics", "cosine", "--scope", "local", "--no-latency", "-q"]
    assert main([str(folder), str(tmp_path / "a"), *common, "--remove", "2", "--exclude", "0,l3_out",
                 "--report", str(tmp_path / "a.json")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert sorted(r["index"] for r in a["removed"]) == [1, 2] and a["removed_ids"] == [
        r["id"] for r in a["removed"]]
    assert main([str(folder), str(tmp_path / "b"), *common, "--plan", str(tmp_path / "a.json"),
                 "--report", str(tmp_path / "b.json")]) == 0
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["removed"] == a["removed"] and b["rounds"] == []
    assert (tmp_path / "a" / "model.onnx").read_bytes() != b""
    with pytest.raises(InputError, match="not a decoder layer"):
        from onnx_consensus.llm.layers import layer_numbers

        layer_numbers(["nope"], find_decoder_layers(synthetic_decoder(PLAIN)))


def test_is_decoder_needs_a_cache_shaped_interface():
    from onnx import TensorProto, helper

    from onnx_consensus.llm.run import is_decoder

    assert is_decoder(synthetic_decoder(PLAIN)) and is_decoder(synthetic_decoder(FUSED))
    f = TensorProto.FLOAT
    nodes = [helper.make_node("Relu", [f"x{i}"], [f"y{i}"]) for i in range(2)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(f"x{i}", f, [1, 2, 3, 4]) for i in range(2)],
                          [helper.make_tensor_value_info(f"y{i}", f, [1, 2, 3, 4]) for i in range(2)])
    assert not is_decoder(helper.make_model(g))


@pytest.mark.parametrize("form", FORMS)
def test_output_kl_of_layers_is_against_the_original_logits(form, monkeypatch):
    """Global scope, output_kl: the mean KL of the next-token softmax of the ORIGINAL model vs the model
    without the layer (and the layers removed before), recomputed here by hand; with a tiny reference cap
    the same formula holds on the subset of rows kept. The local scope refuses output metrics."""
    from onnx_consensus.llm import scoring as llm_scoring
    from onnx_consensus.llm.perplexity import logits_name

    model = synthetic_decoder(form)
    work = expose_residual_sums(model) if form == FUSED else model
    report = find_decoder_layers(work)
    ids = np.random.default_rng(1).integers(0, V, (4, 5))
    lg = logits_name(work)

    def logits(layers):
        m = remove_layers(work, layers, report=report) if layers else work
        a = make_session(m).run([lg], prefill_feed(m, ids))[0]
        return a.reshape(-1, a.shape[-1]).astype(np.float64)

    def kl(p_logits, q_logits):
        lp = p_logits - np.log(np.exp(p_logits - p_logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - p_logits.max(1, keepdims=True)
        lq = q_logits - np.log(np.exp(q_logits - q_logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - q_logits.max(1, keepdims=True)
        return float((np.exp(lp) * (lp - lq)).sum(1).mean())

    for cap_rows in (None, 7):  # every row, then 7 of the 20 token rows (the reference's memory cap)
        if cap_rows:
            monkeypatch.setattr(llm_scoring, "OUTPUT_REF_VALUES", cap_rows * V)
        ref = llm_scoring.original_logits(work, ids, seed=0)
        rows = llm_scoring.output_rows_of(np.arange(ids.size), V, 0)
        assert ref.shape == (len(rows), V) and len(rows) == (cap_rows or ids.size)
        r = score_layers(work, report, ids, removed=[1], metrics=("output_kl",), scope="global", reference=ref)
        orig = logits([])[rows]
        for b in r.blocks:
            i = report.by_id()[b.id].index
            assert math.isclose(b.scores["output_kl"], kl(orig, logits([1, i])[rows]), rel_tol=1e-4, abs_tol=1e-7)
        # against the current (pruned) model instead, the scores differ: the reference is the original's
        cur = score_layers(work, report, ids, removed=[1], metrics=("output_kl",), scope="global")
        assert [b.scores["output_kl"] for b in cur.blocks] != [b.scores["output_kl"] for b in r.blocks]
    with pytest.raises(InputError, match="global"):
        score_layers(work, report, ids, metrics=("output_kl",), scope="local")


@pytest.mark.parametrize("form", FORMS)
def test_inspect_decoder_macs_per_token(form, tmp_path, capsys):
    """inspect on a decoder export: its layers and MACs per token (batch 1, one token, an empty cache): per layer
    the six D x D projections and q.k, p.v over the one position; the LM head D x V."""
    path = tmp_path / "m.onnx"
    onnx.save_model(synthetic_decoder(form), str(path))
    assert main(["inspect", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    d = 8
    assert out["unit"] == "decoder layer" and len(out["blocks"]) == 4
    assert out["macs"] == 4 * (6 * d * d + 2 * d) + d * V
    assert [b["macs"] for b in out["blocks"]] == [6 * d * d + 2 * d] * 4
