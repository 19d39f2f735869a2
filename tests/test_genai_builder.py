"""Exports of the current onnxruntime-genai model builder (0.18: the cache's head size written as the symbol
``kv_cache_dim``; ``-p int4`` writes ``MatMulNBits``), inspected, pruned by the CLI and generated in
onnxruntime-genai (issue 23).

The models come from ``python -m tools.data.build_llms --tiny DIR`` (a random-weight 4-layer Llama and, for every
layer, the same model with that layer deleted in PyTorch before export), built once per session in a
subprocess (seconds). Skipped, with the reason, when onnxruntime-genai or transformers is not installed.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_consensus.cli import main
from onnx_consensus.graph.kv_dims import symbolic_cache_dims
from onnx_consensus.llm.folder_formats import genai_dims
from onnx_consensus.pipeline import inspect
from tests.helpers import genai_generate

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "int4")
PROMPT = (5, 17, 30, 42)
_missing = [m for m in ("onnxruntime_genai", "transformers") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"{', '.join(_missing)} not installed (the llm extra)")




def _per_token_macs(info: dict) -> int:
    """Closed form: the weight matmuls one token goes through (q, k, v, o, gate, up, down per layer; LM head)."""
    c = info["config"]
    h, inter, heads, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head = h // heads
    layer = h * (heads + 2 * kv) * head + heads * head * h + 3 * h * inter
    return c["num_hidden_layers"] * layer + h * info["vocab"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_inspect_counts_layers_parameters_and_macs(tiny, precision):
    info = json.loads((tiny / "build_info.json").read_text())
    folder = tiny / "llama" / f"genai_{precision}"
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    dims = [d.dim_param for d in model.graph.input[2].type.tensor_type.shape.dim]
    assert dims[3] == "kv_cache_dim"  # what the 0.18 builder writes: the case this test is about
    out = inspect(folder)
    assert out["unit"] == "decoder layer" and [b["index"] for b in out["blocks"]] == [0, 1, 2, 3]
    assert out["macs"] == _per_token_macs(info)
    assert all(b["macs"] == (out["macs"] - 64 * 256) // 4 for b in out["blocks"])
    # parameters: PyTorch's count plus the rotary cos/sin tables the builder stores, whatever the precision
    rotary = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name in ("cos_cache", "sin_cache"))
    assert out["params"] == info["torch_params"] + rotary
    full = onnx.load(str(folder / "model.onnx"))  # with its external data: the bytes as numpy holds them
    stored = sum(numpy_helper.to_array(t).nbytes for t in full.graph.initializer)
    assert out["weight_bytes"] == stored
    if precision == "fp32":
        assert out["weight_bytes"] == 4 * out["params"]
    else:  # every matmul weight packed at 4 bits (half a byte per value); embeddings, norms, scales in fp32
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert len(nbits) == 4 * 5 + 1  # qkv (fused), o, gate, up, down per layer; the LM head
        inits = {t.name: t for t in full.graph.initializer}
        for n in nbits:
            attrs = {a.name: a.i for a in n.attribute}
            packed = numpy_helper.to_array(inits[n.input[1]]).nbytes
            assert attrs["bits"] == 4 and packed == attrs["N"] * attrs["K"] // 2
        assert out["weight_bytes"] < 0.4 * 4 * out["params"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_head_size_read_from_the_graph_matches_genai_config(tiny, precision):
    folder = tiny / "llama" / f"genai_{precision}"
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    config = genai_dims(folder)
    assert config == {"kv_heads": 2, "head_size": 16}
    dims = symbolic_cache_dims(model)  # from the GroupQueryAttention and its projection, no config
    assert len(dims) == 8 and set(dims.values()) == {(config["kv_heads"], config["head_size"])}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_cli_prunes_and_the_folder_generates_like_the_reference(tiny, calib, tmp_path, capsys, precision):
    """The default criterion picks a layer; the written folder generates in onnxruntime-genai the same tokens as
    the export of the PyTorch model with that layer deleted before export, and other tokens than the original."""
    og = pytest.importorskip("onnxruntime_genai")
    src = tiny / "llama" / f"genai_{precision}"
    out, rep = tmp_path / "out", tmp_path / "r.json"
    code = main([str(src), str(out), "--calib", str(calib), "--seq-len", "32", "--unit", "layer", "--remove", "1",
                 "--no-latency", "-q", "--report", str(rep)])
    assert code == 0, capsys.readouterr().err
    report = json.loads(rep.read_text())
    (layer,) = [x["index"] for x in report["removed"]]
    assert report["weight_bytes"]["before"] == inspect(src)["weight_bytes"] > report["weight_bytes"]["after"]
    got = genai_generate(og, out, 20, prompt=PROMPT)
    assert len(got) == 20
    assert got == genai_generate(og, tiny / f"llama_drop{layer}" / f"genai_{precision}", 20, prompt=PROMPT)
    assert got != genai_generate(og, src, 20, prompt=PROMPT)
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == 3


def test_inspect_cli_prints_the_int4_parameters(tiny, capsys):
    assert main(["inspect", str(tiny / "llama" / "genai_int4")]) == 0
    out = capsys.readouterr().out
    info = json.loads((tiny / "build_info.json").read_text())
    assert "4 removable block(s); MACs " + f"{_per_token_macs(info):,}" in out
    assert "MACs per token" in out and "error" not in out


def test_finetuning_the_fused_fp32_export_fails_in_one_line_and_writes_the_pruned_folder(tiny, calib, tmp_path,
                                                                                        capsys):
    """The bridge cannot train GroupQueryAttention: one error line naming it, exit 4, the pruned folder written
    (one CLI path for every model kind: the same message and code as a block model's failed fine-tuning)."""
    pytest.importorskip("torch")
    out, rep = tmp_path / "out", tmp_path / "r.json"
    assert main([str(tiny / "llama" / "genai_fp32"), str(out), "--calib", str(calib), "--seq-len", "32", "--remove",
                 "1", "--metrics", "cosine", "--scope", "local", "--finetune-epochs", "1", "--no-latency", "-q",
                 "--report", str(rep)]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GroupQueryAttention" in err[0] and err[0].startswith("onnx-cprune: error: ")
    assert "GroupQueryAttention" in json.loads(rep.read_text())["finetune"]["error"]
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == 3


def test_finetuning_the_int4_export_refused_in_one_line(tiny, calib, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(tiny / "llama" / "genai_int4"), str(out), "--calib", str(calib), "--seq-len", "32", "--remove",
                 "1", "--finetune-epochs", "1", "--no-latency", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "quantized graph (MatMulNBits)" in err and "prune the float model" in err
    assert not out.exists()


def test_tied_int4_embeddings_gather_block_quantized(tiny, calib, tmp_path, capsys):
    """With tied embeddings the int4 export reads its embeddings through GatherBlockQuantized from the LM head's
    packed weight: inspected (the MACs per token of the untied export, parameters without the second copy of
    the embeddings), pruned, and the folder generates like the export of the PyTorch model with that layer gone."""
    og = pytest.importorskip("onnxruntime_genai")
    src = tiny / "llama_tied" / "genai_int4"
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    assert any(n.op_type == "GatherBlockQuantized" for n in model.graph.node)
    info = json.loads((tiny / "build_info.json").read_text())
    out = inspect(src)
    assert out["macs"] == _per_token_macs(info)
    assert out["params"] == inspect(tiny / "llama" / "genai_int4")["params"] - 64 * 256  # one embedding matrix
    dst, rep = tmp_path / "out", tmp_path / "r.json"
    assert main([str(src), str(dst), "--calib", str(calib), "--seq-len", "32", "--remove", "1", "--no-latency",
                 "-q", "--report", str(rep)]) == 0, capsys.readouterr().err
    (layer,) = [x["index"] for x in json.loads(rep.read_text())["removed"]]
    got = genai_generate(og, dst, 20, prompt=PROMPT)
    assert got == genai_generate(og, tiny / f"llama_tied_drop{layer}" / "genai_int4", 20, prompt=PROMPT)
