"""Decoder LLMs: quantization after pruning (int4 / int8 / fp16, export folders that still generate in
onnxruntime-genai), the four-row table, PruneMe's span criterion and the layer count for a latency target
(``onnx_consensus.llm.quantize``, ``.variants``, ``.spans``, ``.layer_latency``).

The models are the tiny random-weight Llama of ``python -m tools.data.build_llms --tiny DIR`` (4 layers, and each
single-layer deletion exported from PyTorch), built once for this module in a subprocess (seconds).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_consensus.errors import InputError, TargetError
from onnx_consensus.graph.decoder import prefill_feed
from onnx_consensus.graph.flops import count_params
from onnx_consensus.graph.kv_surgery import remove_layers
from onnx_consensus.llm.folder import prune_folder
from onnx_consensus.llm.layer_latency import LayerCost, layers_for_target, measure_layer_cost, meet_target
from onnx_consensus.llm.perplexity import perplexity
from onnx_consensus.llm.quantize import DECODER_FORMATS, quantize_decoder, quantize_export
from onnx_consensus.llm.spans import angular_distance, best_span, decoder_span, last_token_states, span_distances
from onnx_consensus.llm.variants import decoder_table_lines, disk_bytes, measure_decoder_variants
from tests.helpers import genai_generate

ROOT = Path(__file__).resolve().parents[1]
PROMPT = (5, 17, 30, 42)
_missing = [m for m in ("onnxruntime_genai", "transformers") if importlib.util.find_spec(m) is None]
needs_llm = pytest.mark.skipif(bool(_missing), reason=f"{', '.join(_missing)} not installed (the llm extra)")




def _windows(n: int = 6, seq: int = 24, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, (n, seq))


def _logits(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], prefill_feed(model, ids))[0]


def _greedy(path: str, n_new: int) -> list[int]:
    """onnxruntime's greedy loop with the KV cache on the model file ``path``: prefill PROMPT, then one token
    per step, the ``present.*`` outputs fed back as ``past_key_values.*``."""
    model = onnx.load(path, load_external_data=False)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    tokens, step, plen, past = list(PROMPT), np.array([PROMPT], np.int64), 0, {}
    for _ in range(n_new):
        feed = {**prefill_feed(model, step, past=plen), **past}
        out = dict(zip(names, sess.run(None, feed)))
        plen += step.shape[1]
        tokens.append(int(out["logits"][0, -1].argmax()))
        step = np.array([[tokens[-1]]], np.int64)
        past = {n.replace("present", "past_key_values"): v for n, v in out.items() if n.startswith("present")}
    return tokens


# ---------------------------------------------------------------- PruneMe spans (pure numpy)

def test_angular_distance_closed_form():
    a = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [2.0, 2.0]])
    b = np.array([[3.0, 0.0], [0.0, 5.0], [-1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    np.testing.assert_allclose(angular_distance(a, b), [0.0, 0.5, 1.0, 0.5, 0.25], atol=1e-12)


def test_span_distances_are_the_mean_angle_between_entry_and_exit():
    """Stream states of 3 samples in 2-D at known angles (arbitrary norms): layer i turns sample w by
    turns[i] * (1 + w / 10) radians, so d(l, n) = mean_w sum(turns[l:l+n]) * (1 + w / 10) / pi."""
    turns = np.array([0.9, 0.1, 0.2, 0.05, 0.6])
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 2 * np.pi, 3)
    scale = 1 + np.arange(3) / 10
    angles = base + np.concatenate([[0], np.cumsum(turns)])[:, None] * scale  # (L + 1, samples)
    states = [np.stack([np.cos(a), np.sin(a)], 1) * rng.uniform(0.5, 4, (3, 1)) for a in angles]
    for n in (1, 2, 3):
        want = np.array([turns[s:s + n].sum() * scale.mean() / np.pi for s in range(len(turns) - n + 1)])
        np.testing.assert_allclose(span_distances(states, n), want, rtol=1e-9)
    assert best_span(states, 1).layers == [3]
    assert best_span(states, 2).layers == [2, 3]  # 0.25 beats 0.3 (1, 2) and 0.65 (3, 4)
    span = best_span(states, 3)
    assert span.layers == [1, 2, 3] and span.distance == pytest.approx(0.35 * scale.mean() / np.pi)
    assert best_span(states, 2, starts=[0, 3]).layers == [3, 4]
    with pytest.raises(ValueError):
        span_distances(states, 6)


def test_best_span_tie_takes_the_earlier_start():
    states = [np.array([[1.0, 0.0]])] * 4
    assert best_span(states, 2).start == 0


# ---------------------------------------------------------------- PruneMe on the tiny Llama

def _bench_pruneme(hf: Path, folder: Path, calib: Path, span: int) -> list[int]:
    """tools.bench.llm_scale's PyTorch PruneMe (transformers, output_hidden_states), run in this process."""
    import torch

    from tools.bench.llm_scale import TORCH

    argv, threads, buf = sys.argv, torch.get_num_threads(), io.StringIO()
    sys.argv = ["bench_llm_scale.TORCH", str(hf), str(folder), str(calib), str(span)]
    try:
        with contextlib.redirect_stdout(buf):
            exec(compile(TORCH, "bench_llm_scale.TORCH", "exec"), {"__name__": "__main__"})
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    return json.loads(buf.getvalue().strip().splitlines()[-1])["pruneme_span"]


@needs_llm
def test_decoder_span_agrees_with_the_pytorch_implementation(tiny, calib):
    import torch
    import transformers

    from onnx_consensus.llm.text import find_tokenizer, load_text
    from onnx_consensus.options import Options

    folder, hf = tiny / "llama" / "genai_fp32", tiny / "llama" / "hf"
    model = onnx.load(str(folder / "model.onnx"))
    o = Options()
    data = load_text(calib, find_tokenizer(folder, None), seq_len=128, max_samples=16)
    windows, _ = data.split_windows(o.run.holdout, o.criterion.seed)
    for n in (1, 2, 3):
        assert decoder_span(model, windows, n).layers == _bench_pruneme(hf, folder, calib, n)
    # the states themselves: transformers' hidden states at the last token (the last one after the final
    # norm, whose weight is uniform here: the same direction)
    states = last_token_states(model, windows[:4])
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        hs = ref(torch.from_numpy(windows[:4]), output_hidden_states=True).hidden_states
    for i, (got, want) in enumerate(zip(states, hs)):
        want = want[:, -1].numpy()
        if i == len(states) - 1:
            np.testing.assert_allclose(angular_distance(got, want), 0, atol=1e-3)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- quantization

@needs_llm
@pytest.mark.parametrize("fmt,op", [("int4", "MatMulNBits"), ("int8", "MatMulInteger"), ("fp16", None)])
def test_pruned_quantized_folder_generates_in_onnxruntime_genai(tiny, tmp_path, fmt, op):
    """Prune layer 1, quantize: the folder generates in onnxruntime-genai the tokens of the same quantization
    of the model exported without layer 1, and of onnxruntime's own greedy loop on the written model."""
    og = pytest.importorskip("onnxruntime_genai")
    src = tiny / "llama" / "genai_fp32"
    prune_folder(src, tmp_path / "pruned", [1])
    out = quantize_export(tmp_path / "pruned", tmp_path / fmt, fmt)
    ref = quantize_export(tiny / "llama_drop1" / "genai_fp32", tmp_path / "ref", fmt)
    q = onnx.load(str(Path(out) / "model.onnx"))
    if op:
        assert any(n.op_type == op for n in q.graph.node)
    else:
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in q.graph.initializer)
    p = onnx.load(str(tmp_path / "pruned" / "model.onnx"), load_external_data=False)
    assert [(v.name, v.type) for v in q.graph.input] == [(v.name, v.type) for v in p.graph.input]
    assert [(v.name, v.type) for v in q.graph.output] == [(v.name, v.type) for v in p.graph.output]
    assert (Path(out) / "genai_config.json").read_text() == (tmp_path / "pruned" / "genai_config.json").read_text()
    got = genai_generate(og, out, 20, prompt=PROMPT)
    assert len(got) == 20
    assert got == genai_generate(og, ref, 20, prompt=PROMPT)
    assert got == _greedy(str(Path(out) / "model.onnx"), 16)


@needs_llm
def test_quantize_decoder_keeps_the_float_model_close_and_refuses_bad_input(tiny, tmp_path):
    model = onnx.load(str(tiny / "llama" / "genai_fp32" / "model.onnx"))
    ids = _windows(2, 12)
    ref = _logits(model, ids).reshape(-1, 256)
    before = model.SerializeToString()
    cos = {}  # mean cosine of the next-token logits to the float model's (random weights of std 0.3: harsh)
    for fmt in DECODER_FORMATS:
        got = _logits(quantize_decoder(model, fmt), ids).reshape(-1, 256)
        cos[fmt] = np.mean((got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1))
    assert model.SerializeToString() == before  # input never modified
    assert cos["fp16"] > 0.999 and cos["int8"] > 0.98 and cos["int4"] > 0.7, cos
    assert cos["fp16"] > cos["int8"] > cos["int4"]
    with pytest.raises(InputError, match="must be one of"):
        quantize_decoder(model, "int3")
    int4 = onnx.load(str(tiny / "llama" / "genai_int4" / "model.onnx"))
    with pytest.raises(InputError, match="already quantized"):
        quantize_decoder(int4, "int8")
    with pytest.raises(InputError, match="already quantized"):
        quantize_export(tiny / "llama" / "genai_int4", tmp_path / "never", "int4")
    assert not (tmp_path / "never").exists()
    # a model file in, a model file out (external data beside it, as the input had)
    out = quantize_export(tiny / "llama" / "genai_fp32" / "model.onnx", tmp_path / "q.onnx", "int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "q.onnx.data"]
    np.testing.assert_allclose(_logits(onnx.load(out), ids), _logits(quantize_decoder(model, "int8"), ids),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form,fmt", [("plain", "int4"), ("plain", "int8"), ("plain", "fp16"), ("fused", "int4"),
                                      ("fused", "int8")])
def test_synthetic_decoders_quantized(form, fmt):
    """The decomposed (optimum-like) and fused forms of tests.test_decoder_llm's synthetic decoder: the same
    interface, logits and caches close to the float model's, the caches exact in shape."""
    from onnx_consensus.graph.decoder import dummy_feed
    from tests.test_decoder_llm import V, synthetic_decoder

    model = synthetic_decoder(form)
    q = quantize_decoder(model, fmt)
    assert [(v.name, v.type) for v in q.graph.input] == [(v.name, v.type) for v in model.graph.input]
    assert [(v.name, v.type) for v in q.graph.output] == [(v.name, v.type) for v in model.graph.output]
    feed = dummy_feed(model, batch=2, seq=5, vocab=V)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
           for m in (model, q)]
    for want, got in zip(*run):
        assert got.shape == want.shape and got.dtype == want.dtype
        cos = (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)
        assert cos > {"int4": 0.95, "int8": 0.99, "fp16": 0.999}[fmt], (fmt, cos)


@needs_llm
def test_four_rows(tiny):
    model = onnx.load(str(tiny / "llama" / "genai_fp32" / "model.onnx"))
    pruned = remove_layers(model, [2])
    windows = _windows()
    v = measure_decoder_variants(model, pruned, "int4", windows, prompt=windows[0, :8], steps=4, repeats=1)
    rows = {r.name: r for r in v.rows}
    assert list(rows) == ["original", "quantized", "pruned", "pruned + quantized"]
    assert rows["original"].perplexity == pytest.approx(perplexity(model, windows), rel=1e-9)
    assert rows["pruned"].perplexity == pytest.approx(perplexity(pruned, windows), rel=1e-9)
    assert rows["pruned + quantized"].perplexity == pytest.approx(perplexity(v.model, windows), rel=1e-9)
    assert rows["original"].params == count_params(model) and rows["pruned"].params == count_params(pruned)
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q, k, v (GQA: half), o, MLP, two norms
    assert rows["original"].params - rows["pruned"].params == layer
    assert rows["quantized"].params == rows["original"].params  # an int4 weight counts its values
    assert rows["original"].bytes == model.ByteSize()
    assert rows["quantized"].bytes < rows["original"].bytes and rows["pruned + quantized"].bytes < rows["pruned"].bytes
    assert all(r.decode_tok_s > 0 and r.prefill_tok_s > 0 for r in v.rows)
    assert any(n.op_type == "MatMulNBits" for n in v.model.graph.node)
    js = v.to_json()
    assert js["written"] == "pruned + quantized" and js["samples"] == len(windows) and len(js["rows"]) == 4
    lines = decoder_table_lines(json.loads(json.dumps(js)))
    assert len(lines) == 5 and lines[4].startswith("pruned + quantized")
    assert disk_bytes(model) == model.ByteSize()


# ---------------------------------------------------------------- latency target

def test_layers_for_target_closed_form():
    cost = LayerCost(full_s=10.0, probe_s=6.0, probe_removed=2, per_layer_s=2.0, fixed_s=2.0, n_layers=4,
                     phase="decode", rounds=1, threads=1)
    # t(N removed) = 10 - 2N: 0.8 -> 1 layer (8.0), 0.79 -> 2 (6.0), 0.4 -> 3 (4.0), 1.0 -> 0
    assert [layers_for_target(cost, f) for f in (1.0, 0.8, 0.79, 0.6, 0.4)] == [0, 1, 2, 2, 3]
    assert cost.predicted_s(3) == pytest.approx(4.0)
    with pytest.raises(TargetError, match="leaves 40%"):
        layers_for_target(cost, 0.3)  # 3 removed (one kept) is the most: 4.0 > 3.0
    with pytest.raises(InputError):
        layers_for_target(cost, 1.5)


@needs_llm
def test_written_model_meets_the_latency_target(tiny):
    """Measure once, pick N for 70% of the decode time, remove N layers: the pruned model's measured decode
    time (alternated with the original's, medians) is within the target; a miss under load removes one more
    layer and times again (``meet_target``), as the block path's latency target does."""
    model = onnx.load(str(tiny / "llama" / "genai_fp32" / "model.onnx"))
    prompt = _windows(1, 16)[0]
    cost = measure_layer_cost(model, prompt, rounds=5, steps=16)
    assert cost.per_layer_s > 0 and cost.n_layers == 4 and cost.probe_removed == 2
    n = layers_for_target(cost, 0.7)
    assert 1 <= n <= 3
    check = meet_target(model, [3, 2, 1, 0], 0.7, cost, prompt, rounds=7, steps=16)
    assert check.met, check.attempts
    assert check.removed == [3, 2, 1, 0][:len(check.removed)] and len(check.removed) >= n
    last = check.attempts[-1]
    assert last["measured_s"] <= 0.7 * last["original_s"] and last["removed"] == check.removed
    # the model returned is the one timed: the original without those layers
    ids = _windows(1, 8)
    np.testing.assert_allclose(_logits(check.model, ids), _logits(remove_layers(model, check.removed), ids),
                               rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- the prune run: --target-latency, --quantize

def _hold_windows(folder: Path, calib: Path, max_samples: int, seq_len: int) -> np.ndarray:
    """The hold-out windows of a prune run with these data options (the default --holdout and --seed)."""
    from onnx_consensus.llm.text import find_tokenizer, load_text
    from onnx_consensus.options import Options

    o = Options()
    data = load_text(calib, find_tokenizer(folder, None), seq_len=seq_len, max_samples=max_samples)
    return data.split_windows(o.run.holdout, o.criterion.seed)[1]


@needs_llm
def test_prune_run_meets_a_latency_target(tiny, calib, tmp_path):
    """`--target-latency 0.7` on a genai folder: the report's timing of the written model meets 0.7 of the
    original timed beside it; the layer count is the time model's (or more, one per missed timing); the layers
    are the ones a `--remove k` run of the same criterion removes; the written model is the original without
    them, its genai_config updated."""
    from onnx_consensus.cli import main

    src = tiny / "llama" / "genai_fp32"
    flags = ["--calib", str(calib), "--max-samples", "12", "--seq-len", "32", "--threads", "1", "-q"]
    assert main([str(src), str(tmp_path / "fast"), *flags, "--target-latency", "0.7",
                 "--report", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    lt, layers = r["latency_target"], [x["index"] for x in r["removed"]]
    assert lt["met"] and lt["fraction"] == 0.7 and lt["phase"] == "decode"
    assert lt["measured_ms"] <= lt["goal_ms"] == pytest.approx(0.7 * lt["original_ms"])
    last = lt["attempts"][-1]
    assert last["measured_ms"] == lt["measured_ms"] and last["layers"] == layers
    assert len(layers) == lt["layers_for_target"] + len(lt["attempts"]) - 1 >= 1
    assert layers_for_target(LayerCost(**lt["model"]), 0.7) == lt["layers_for_target"]
    assert len(r["rounds"]) == len(layers)  # the rounds of the removals written
    assert main([str(src), str(tmp_path / "k"), *flags, "--remove", str(len(layers)),
                 "--report", str(tmp_path / "k.json")]) == 0
    k = json.loads((tmp_path / "k.json").read_text())
    assert k["removed_ids"] == r["removed_ids"] and [x["order"] for x in k["rounds"]] == [x["order"] for x in r["rounds"]]
    model = onnx.load(str(src / "model.onnx"))
    ids = _windows(2, 8)
    np.testing.assert_allclose(_logits(onnx.load(str(tmp_path / "fast" / "model.onnx")), ids),
                               _logits(remove_layers(model, layers), ids), rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "fast" / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["num_hidden_layers"] == 4 - len(layers)


@needs_llm
def test_prune_run_quantizes_int4_and_the_folder_generates(tiny, calib, tmp_path):
    """The API with --quantize int4 after removing one layer: the folder generates in onnxruntime-genai the
    tokens of the same layer removed then quantized by hand (``prune_folder``, ``quantize_export``), keeps the
    pruned interface, and the report's four rows are this run's perplexities, parameters and timings. A
    --target-latency-ms the original already meets removes nothing and quantizes only."""
    og = pytest.importorskip("onnxruntime_genai")
    import onnx_consensus as oc
    from onnx_consensus import pipeline
    from onnx_consensus.llm.output import summary
    from onnx_consensus.variants import ROW_NAMES

    src = tiny / "llama" / "genai_fp32"
    data = oc.DataOptions(max_samples=12, seq_len=32)
    out = oc.prune(str(src), str(calib), data_options=data, target=oc.TargetOptions(remove=1),
                   run=oc.RunOptions(threads=1), output=oc.OutputOptions(quantize="int4", latency_runs=4))
    pipeline.write(out, tmp_path / "q")
    removed = out.decoder.removed
    prune_folder(src, tmp_path / "p", removed)
    quantize_export(tmp_path / "p", tmp_path / "ref", "int4")
    got = genai_generate(og, tmp_path / "q", 20, prompt=PROMPT)
    assert len(got) == 20 and got == genai_generate(og, tmp_path / "ref", 20, prompt=PROMPT)
    q, p = (onnx.load(str(tmp_path / k / "model.onnx")) for k in ("q", "p"))
    assert any(n.op_type == "MatMulNBits" for n in q.graph.node)
    assert [(v.name, v.type) for v in q.graph.input] == [(v.name, v.type) for v in p.graph.input]
    assert [(v.name, v.type) for v in q.graph.output] == [(v.name, v.type) for v in p.graph.output]
    rep = out.report
    rows = {r["name"]: r for r in rep["quantize"]["rows"]}
    assert tuple(rows) == ROW_NAMES and rep["quantize"]["format"] == "int4"
    hold = _hold_windows(src, calib, 12, 32)
    assert rep["quantize"]["samples"] == len(hold) == rep["perplexity"]["holdout"]["windows"]
    assert rows["original"]["perplexity"] == pytest.approx(rep["perplexity"]["holdout"]["before"], rel=1e-9)
    assert rows["pruned"]["perplexity"] == pytest.approx(rep["perplexity"]["holdout"]["after"], rel=1e-9)
    assert rows["pruned + quantized"]["perplexity"] == pytest.approx(perplexity(q, hold), rel=1e-6)
    assert rows["pruned"]["params"] == count_params(p) and rows["pruned + quantized"]["params"] == count_params(p)
    assert rows["quantized"]["bytes"] < rows["original"]["bytes"]
    assert rows["pruned + quantized"]["bytes"] < rows["pruned"]["bytes"]
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in rows.values())
    text = summary(rep)
    assert "--quantize int4" in text and text.splitlines()[-1].lstrip().startswith("pruned + quantized")
    # a target the original meets: nothing removed, the original quantized is written
    out = oc.prune(str(src), str(calib), data_options=data, target=oc.TargetOptions(target_latency_ms=1e6),
                   run=oc.RunOptions(threads=1), output=oc.OutputOptions(quantize="fp16", latency=False))
    lt = out.report["latency_target"]
    assert out.decoder.removed == [] and lt["met"] and lt["fraction"] is None and lt["target_ms"] == 1e6
    pipeline.write(out, tmp_path / "fp16")
    model = onnx.load(str(src / "model.onnx"))
    ids = _windows(2, 8)
    np.testing.assert_allclose(_logits(onnx.load(str(tmp_path / "fp16" / "model.onnx")), ids),
                               _logits(quantize_decoder(model, "fp16"), ids), rtol=1e-6, atol=1e-6)
    assert genai_generate(og, tmp_path / "fp16", 12, prompt=PROMPT)[:4] == list(PROMPT)
