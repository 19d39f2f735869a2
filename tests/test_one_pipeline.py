"""One pipeline for every model kind (issue 21): the API and the CLI give the same results on a block model and
on a decoder LLM; every option of `onnx-cprune prune` is either honoured by decoder runs (and exercised on one
in a test) or refused in one line naming it; the rounds of ``schedule.rounds`` against a plain greedy loop."""
from __future__ import annotations

import inspect as pyinspect
import json
import os

import numpy as np
import onnx
import pytest

import onnx_consensus as oc
from onnx_consensus import pipeline
from onnx_consensus.cli import main
from onnx_consensus.cli.parser import build_parser
from onnx_consensus.errors import InputError
from onnx_consensus.graph.decoder import PLAIN, prefill_feed
from onnx_consensus.options import GROUPS
from onnx_consensus.report import METADATA_KEY
from onnx_consensus.runtime import make_session
from onnx_consensus.schedule import rounds
from tests.helpers import residual_mlp, resnet_onnx
from tests.test_decoder_llm import V, synthetic_decoder
from tests.test_llm_prune import _text, _tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def decoder(tmp_path):
    """A 4-layer synthetic decoder's export folder with a word-level tokenizer, and calibration text."""
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(synthetic_decoder(PLAIN), str(src / "model.onnx"))
    _tokenizer(src / "tokenizer.json")
    (src / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    (tmp_path / "calib.txt").write_text(_text(400))
    return src, str(tmp_path / "calib.txt")


def _logits(path, ids) -> np.ndarray:
    m = onnx.load(str(path))
    return make_session(m).run(["logits"], prefill_feed(m, ids))[0]


# ------------------------------------------------------------------------------ the API and the CLI agree

def test_api_and_cli_identical_on_a_block_model(tmp_path):
    model_path = tmp_path / "in.onnx"
    onnx.save_model(residual_mlp(6), str(model_path))
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "x.npy", np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32))
    assert main([str(model_path), str(tmp_path / "cli.onnx"), "--calib", str(calib), "--metrics", "cka,output",
                 "--remove", "2", "--batch-size", "16", "--no-latency", "-q",
                 "--report", str(tmp_path / "cli.json")]) == 0
    outcome = oc.prune(str(model_path), str(calib), criterion=oc.CriterionOptions(metrics=("cka", "output")),
                       target=oc.TargetOptions(remove=2), run=oc.RunOptions(batch_size=16),
                       output=oc.OutputOptions(latency=False, report=str(tmp_path / "api.json")))
    written = pipeline.write(outcome, tmp_path / "api.onnx")
    cli, api = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("cli", "api"))
    assert len(api["removed_ids"]) == 2 and outcome.removed_ids == api["removed_ids"] == cli["removed_ids"]
    assert written.model == api["output"] and cli["kind"] == api["kind"] == "blocks"
    assert [r["order"] for r in cli["rounds"]] == [r["order"] for r in api["rounds"]]
    x = {"x": np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)}
    got = [make_session(onnx.load(str(tmp_path / f"{k}.onnx"))).run(None, x)[0] for k in ("cli", "api")]
    np.testing.assert_array_equal(got[0], got[1])
    assert not np.allclose(got[0], make_session(onnx.load(str(model_path))).run(None, x)[0])


def test_api_and_cli_identical_on_a_decoder(decoder, tmp_path):
    src, calib = decoder
    flags = ["--seq-len", "8", "--remove", "2", "--metrics", "cosine", "--scope", "local", "--no-latency", "-q"]
    assert main([str(src), str(tmp_path / "cli"), "--calib", calib, *flags, "--report", str(tmp_path / "cli.json")]) == 0
    options = oc.Options(data=oc.DataOptions(seq_len=8), target=oc.TargetOptions(remove=2),
                         criterion=oc.CriterionOptions(metrics=("cosine",), scope="local"),
                         output=oc.OutputOptions(latency=False, report=str(tmp_path / "api.json")))
    outcome = oc.prune(str(src), calib, criterion=options.criterion, target=options.target,
                       data_options=options.data, output=options.output)
    assert outcome.decoder is not None and outcome.result is None
    written = pipeline.write(outcome, tmp_path / "api")
    cli, api = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("cli", "api"))
    assert len(cli["removed_ids"]) == 2 and outcome.removed_ids == api["removed_ids"] == cli["removed_ids"]
    assert cli["kind"] == api["kind"] == "decoder" and written.model == api["output"]
    ids = np.random.default_rng(3).integers(0, V, (2, 6))
    np.testing.assert_array_equal(_logits(tmp_path / "cli" / "model.onnx", ids),
                                  _logits(tmp_path / "api" / "model.onnx", ids))
    # one stamp for every kind: the written model's provenance says what the report says
    meta = json.loads({p.key: p.value for p in onnx.load(str(tmp_path / "api" / "model.onnx")).metadata_props}
                      [METADATA_KEY])
    assert meta["removed_ids"] == api["removed_ids"] and meta["kind"] == "decoder" and meta["interface"]
    # an in-memory decoder and its calibration text as a TextData: the same layers, written to a model file
    from onnx_consensus.llm.text import load_text

    text = load_text(calib, src / "tokenizer.json", seq_len=8)
    mem = pipeline.run(onnx.load(str(src / "model.onnx")), text, options)
    assert mem.removed_ids == api["removed_ids"]
    pipeline.write(mem, tmp_path / "mem.onnx")
    np.testing.assert_array_equal(_logits(tmp_path / "mem.onnx", ids), _logits(tmp_path / "api" / "model.onnx", ids))


def test_report_common_keys_for_both_kinds(decoder, tmp_path):
    from onnx_consensus.report import COMMON_KEYS

    src, calib = decoder
    outcome = pipeline.run(str(src), calib, oc.Options(data=oc.DataOptions(seq_len=8), target=oc.TargetOptions(
        remove=1), criterion=oc.CriterionOptions(metrics=("cosine",), scope="local"),
        output=oc.OutputOptions(latency=False)))
    model = resnet_onnx(20, "folded")
    data = np.random.default_rng(0).standard_normal((12, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    blocks = oc.prune(model, str(tmp_path), criterion=oc.CriterionOptions(metrics=("cka",)),
                      target=oc.TargetOptions(remove=1), output=oc.OutputOptions(latency=False))
    for report in (outcome.report, blocks.report):
        assert set(COMMON_KEYS) <= set(report), set(COMMON_KEYS) - set(report)
        assert report["removed_ids"] == [r["id"] for r in report["removed"]] and report["seconds"] > 0


# ------------------------------------------------------------------------------ every option, for decoders

def _prune_flags() -> dict[str, object]:
    """{flag: its dataclass field} of every option of `onnx-cprune prune` with a field."""
    out = {}
    for cls in GROUPS:
        for f, m in cls.cli_fields():
            if m["same_as"] is None:
                out[m["flag"]] = m
    parser = build_parser()
    prune = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "prune")[1]
    given = {s for a in prune._actions for s in a.option_strings if s.startswith("--")}
    assert set(out) <= given and given - set(out) == {"--calib", "--debug", "--help"}
    return out


REFUSED_ARGS = {  # a value for each option decoder runs refuse
    "--labels": ["labels.npy"], "--image-size": ["8x8"], "--mean": ["0.5"], "--std": ["0.5"], "--layout": ["NHWC"],
    "--strict": [], "--max-memory": ["6G"], "--input-shape": ["input_ids:1x8"], "--target-flops": ["0.5"],
    "--latency-choice": ["macs"],
    "--min-agreement": ["0.9"], "--feature": ["x"], "--task": ["classify"], "--output-kind": ["logits=class"],
    "--fidelity": ["m:f"], "--token-mask": ["attention_mask:keep"], "--feature-mse": ["1"], "--augment": [],
    "--train": ["train"], "--finetune-between": ["2"], "--keep-partial": [],
}
DECODER_TESTS = ("test_llm_prune.py", "test_llm_scale.py", "test_genai_builder.py", "test_one_pipeline.py",
                 "test_llm_quantize.py")


def test_every_option_is_honoured_or_refused_for_decoders(decoder, tmp_path, capsys):
    """Each option refused for decoders fails in one line naming it, before anything is written; each other
    option appears in a decoder test's command line (test_decoder_options_change_the_run for most)."""
    src, calib = decoder
    flags = _prune_flags()
    refused = {f for f, m in flags.items() if m["decoder"]}
    assert refused == set(REFUSED_ARGS)
    for flag in sorted(refused):
        out = tmp_path / f"o{flag}"
        code = main([str(src), str(out), "--calib", calib, "--remove", "1", flag, *REFUSED_ARGS[flag]])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith(f"onnx-cprune: error: {flag} is not supported "
                                                                 "for decoder LLMs"), (flag, err)
        assert not out.exists()
    sources = "".join(open(os.path.join(HERE, name)).read() for name in DECODER_TESTS)
    for flag, m in flags.items():
        if not m["decoder"]:
            assert f'"{flag}"' in sources or (m["short"] and f'"{m["short"]}"' in sources), \
                f"{flag}: neither refused for decoders nor exercised in {', '.join(DECODER_TESTS)}"


def test_decoder_options_change_the_run(decoder, tmp_path):
    """Options decoder runs honour, each seen in the report or the written files."""
    src, calib = decoder
    (tmp_path / "eval.txt").write_text(_text(120, seed=5))

    def prune(name, *extra, code=0):
        rep = tmp_path / f"{name}.json"
        assert main([str(src), str(tmp_path / name), "--calib", calib, "--seq-len", "8", "--metrics", "cosine,cka",
                     "--no-latency", "-q", "--report", str(rep), *extra]) == code
        return json.loads(rep.read_text()) if code == 0 else None

    r = prune("a", "--remove", "2", "--schedule", "one-shot", "--max-samples", "20", "--holdout", "0.5",
              "--seed", "3", "--pca-dim", "4", "--batch-size", "2", "--weights", "cosine=2", "--eval",
              str(tmp_path / "eval.txt"), "--providers", "cpu", "--threads", "1", "--prescreen", "0")
    assert len(r["rounds"]) == 1 and r["removed_ids"] == r["rounds"][0]["order"][:2]  # one-shot
    assert r["calib"]["windows_scoring"] + r["calib"]["windows_holdout"] == 20 and r["calib"]["windows_holdout"] == 10
    for b in r["rounds"][0]["blocks"]:  # the weighted rank sum, every layer scored (--prescreen 0: not staged)
        assert b["rank_sum"] == pytest.approx(2 * b["ranks"]["cosine"] + b["ranks"]["cka"])
    assert r["perplexity"]["eval"]["windows"] > 0 and r["options"]["seed"] == 3 and r["seed"] == 3
    assert r["options"]["pca_dim"] == 4 and r["options"]["providers"] == ["cpu"]
    # a tokenizer linking out of the export folder: refused, read with --follow-symlinks
    linked = tmp_path / "linked"
    linked.mkdir()
    for f in src.iterdir():
        if f.name != "tokenizer.json":
            (linked / f.name).write_bytes(f.read_bytes())
    os.symlink(src / "tokenizer.json", linked / "tokenizer.json")
    assert main([str(linked), str(tmp_path / "l1"), "--calib", calib, "--seq-len", "8", "--remove", "1",
                 "--no-latency", "-q"]) == 2
    assert main([str(linked), str(tmp_path / "l2"), "--calib", calib, "--seq-len", "8", "--remove", "1",
                 "--no-latency", "-q", "--follow-symlinks"]) == 0
    r = prune("b", "--remove", "2", "--only", "1,2")
    assert sorted(x["index"] for x in r["removed"]) == [1, 2]
    prune("c", "--remove", "2", "--keep-per-stage", "3", code=3)
    assert not (tmp_path / "c").exists()
    r = prune("d", "--remove", "0", "--force-write")
    assert r["removed_ids"] == [] and json.loads((tmp_path / "d" / "config.json").read_text())[
        "num_hidden_layers"] == 4


@pytest.mark.slow  # ~12 s: torch and the bridge
def test_decoder_finetune_options(decoder, tmp_path):
    pytest.importorskip("torch")
    src, calib = decoder
    rep = tmp_path / "r.json"
    assert main([str(src), str(tmp_path / "o"), "--calib", calib, "--seq-len", "8", "--remove", "1", "--metrics",
                 "cosine", "--scope", "local", "--no-latency", "-q", "--report", str(rep), "--finetune-epochs", "1",
                 "--ft-batch-size", "8", "--optimizer", "adamw", "--lr", "0.001", "--weight-decay", "0.01",
                 "--temperature", "2", "--device", "cpu", "--ft-max-steps", "2", "--clip-grad-norm", "0.5",
                 "--bn-stats", "freeze", "--amp", "bf16"]) == 0
    ft = json.loads(rep.read_text())["finetune"]
    assert "error" not in ft and ft["optimizer"] == "adamw" and ft["lr"] == 0.001 and ft["max_steps"] == 2


def test_decoder_sessions_use_the_runs_providers(decoder, monkeypatch):
    """``--providers``: every onnxruntime session of a decoder run (scoring, perplexity) is made under the
    run's providers (``runtime.using_providers``), as a block run's."""
    from onnx_consensus import runtime
    from onnx_consensus.llm import perplexity as ppl_mod
    from onnx_consensus.llm import scoring as scoring_mod

    marker = (("CPUExecutionProvider", {}),)  # what resolve_providers returns here: CPU, with (empty) options
    monkeypatch.setattr(pipeline, "resolve_providers", lambda names: marker)
    seen = []
    for mod in (ppl_mod, scoring_mod):
        real = mod.make_session
        monkeypatch.setattr(mod, "make_session", lambda *a, _real=real, **k: seen.append(
            runtime.current_providers()) or _real(*a, **k))
    src, calib = decoder
    pipeline.run(str(src), calib, oc.Options(data=oc.DataOptions(seq_len=8), target=oc.TargetOptions(remove=1),
                                             criterion=oc.CriterionOptions(metrics=("cosine",), scope="local"),
                                             output=oc.OutputOptions(latency=False)))
    assert len(seen) >= 3 and all(s == marker for s in seen)


def test_api_refuses_decoder_options_in_one_line(decoder):
    src, calib = decoder
    with pytest.raises(InputError, match=r"^--keep-partial is not supported for decoder LLMs"):
        oc.prune(str(src), calib, target=oc.TargetOptions(remove=1), output=oc.OutputOptions(keep_partial=True))
    with pytest.raises(InputError, match=r"^--report: the HTML report is for block models"):
        oc.prune(str(src), calib, target=oc.TargetOptions(remove=1), output=oc.OutputOptions(report="r.html"))


def test_decoder_quantize_api_and_cli(decoder, tmp_path):
    """--quantize on a decoder: the written model is the pruned model quantized (the logits of
    ``quantize_decoder`` on the original without the same layer), the pruned model's interface, the report's four
    rows with the run's own perplexities; the API writes what the CLI writes; --remove 0 quantizes only."""
    from onnx_consensus.graph.kv_surgery import remove_layers
    from onnx_consensus.llm.quantize import quantize_decoder
    from onnx_consensus.variants import ROW_NAMES

    src, calib = decoder
    flags = ["--seq-len", "8", "--metrics", "cosine", "--scope", "local", "--no-latency", "-q", "--quantize", "int8"]
    assert main([str(src), str(tmp_path / "cli"), "--calib", calib, "--remove", "1", *flags,
                 "--report", str(tmp_path / "cli.json")]) == 0
    outcome = oc.prune(str(src), calib, data_options=oc.DataOptions(seq_len=8), target=oc.TargetOptions(remove=1),
                       criterion=oc.CriterionOptions(metrics=("cosine",), scope="local"),
                       output=oc.OutputOptions(latency=False, quantize="int8", report=str(tmp_path / "api.json")))
    pipeline.write(outcome, tmp_path / "api")
    cli, api = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("cli", "api"))
    assert len(cli["removed_ids"]) == 1 and cli["removed_ids"] == api["removed_ids"] == outcome.removed_ids
    original = onnx.load(str(src / "model.onnx"))
    pruned = remove_layers(original, [r["index"] for r in cli["removed"]])
    ref = quantize_decoder(pruned, "int8")
    ids = np.random.default_rng(4).integers(0, V, (2, 6))
    want = make_session(ref).run(["logits"], prefill_feed(ref, ids))[0]
    for k in ("cli", "api"):
        written = onnx.load(str(tmp_path / k / "model.onnx"))
        assert any(n.op_type == "MatMulInteger" for n in written.graph.node)
        assert [(v.name, v.type) for v in written.graph.input] == [(v.name, v.type) for v in pruned.graph.input]
        assert [(v.name, v.type) for v in written.graph.output] == [(v.name, v.type) for v in pruned.graph.output]
        np.testing.assert_allclose(_logits(tmp_path / k / "model.onnx", ids), want, rtol=1e-6, atol=1e-6)
    q = cli["quantize"]
    rows = {r["name"]: r for r in q["rows"]}
    assert q["format"] == "int8" and q["kind"] == "decoder" and tuple(rows) == ROW_NAMES
    assert q["samples"] == cli["perplexity"]["holdout"]["windows"] > 0
    assert rows["original"]["perplexity"] == pytest.approx(cli["perplexity"]["holdout"]["before"], rel=1e-9)
    assert rows["pruned"]["perplexity"] == pytest.approx(cli["perplexity"]["holdout"]["after"], rel=1e-9)
    assert rows["pruned + quantized"]["params"] == rows["pruned"]["params"] == cli["params"]["after"]
    assert all(r["decode_tok_s"] is None for r in q["rows"])  # --no-latency: not timed
    # quantize only: nothing removed, the original quantized written with its configs
    assert main([str(src), str(tmp_path / "q0"), "--calib", calib, "--remove", "0", *flags,
                 "--report", str(tmp_path / "q0.json")]) == 0
    r = json.loads((tmp_path / "q0.json").read_text())
    assert r["removed_ids"] == [] and r["quantize"]["rows"][1]["bytes"] == r["quantize"]["rows"][3]["bytes"]
    assert json.loads((tmp_path / "q0" / "config.json").read_text())["num_hidden_layers"] == 4
    q0 = quantize_decoder(original, "int8")
    np.testing.assert_allclose(_logits(tmp_path / "q0" / "model.onnx", ids),
                               make_session(q0).run(["logits"], prefill_feed(q0, ids))[0], rtol=1e-6, atol=1e-6)


def test_decoder_latency_and_quantize_refusals(decoder, tmp_path, capsys):
    """Bad latency targets and --quantize on an already quantized decoder: one line, exit 2, nothing written."""
    from onnx_consensus.llm.quantize import quantize_decoder

    src, calib = decoder
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    onnx.save_model(quantize_decoder(synthetic_decoder(PLAIN), "int4"), str(quantized / "model.onnx"))
    for f in ("tokenizer.json", "config.json"):
        (quantized / f).write_bytes((src / f).read_bytes())
    cases = [(src, ["--target-latency", "0.5", "--remove", "1"], "a latency target cannot be combined with --remove"),
             (src, ["--target-latency", "1.5"], "--target-latency must be a fraction"),
             (src, ["--target-latency", "0.5", "--target-latency-ms", "3"], "give --target-latency or"),
             (src, ["--target-latency-ms", "0"], "--target-latency-ms must be > 0"),
             (quantized, ["--remove", "1", "--quantize", "int8"], "the model is already quantized (MatMulNBits)")]
    for k, (model, extra, message) in enumerate(cases):
        out = tmp_path / f"o{k}"
        assert main([str(model), str(out), "--calib", calib, "--seq-len", "8", *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"onnx-cprune: error: {message}"), (extra, err)
        assert not out.exists()


# ------------------------------------------------------------------------------ schedule.rounds

class _Scores:
    """A scorer whose scores depend on what is already removed (importance = base + 0.5 per removed
    neighbour), with its calls recorded."""

    def __init__(self, base: dict[str, float]):
        self.base, self.removed, self.calls = base, [], []

    def value(self, i: str) -> float:
        n = int(i[1:])
        return self.base[i] + 0.5 * sum(abs(int(j[1:]) - n) == 1 for j in self.removed)

    def __call__(self, cands):
        self.calls.append(list(cands))

        class R:
            order = sorted(cands, key=lambda i: (self.value(i), i))
        return R()


BASE = {"b0": 0.3, "b1": 0.1, "b2": 0.35, "b3": 0.2, "b4": 0.9, "b5": 0.05}


def _drive(schedule, rescore_top, k):
    s = _Scores(BASE)

    def eligible():
        return {i: i for i in BASE if i not in s.removed}
    for rnd in rounds(eligible, s, schedule=schedule, rescore_top=rescore_top):
        s.removed.append(rnd.first())
        if len(s.removed) == k:
            break
    return s.removed, s.calls


def test_rounds_iterative_is_the_greedy_loop():
    removed, calls = _drive("iterative", None, 4)
    ref = _Scores(BASE)  # the plain loop: score what is left, remove the least important, repeat
    for _ in range(4):
        left = [i for i in BASE if i not in ref.removed]
        ref.removed.append(min(left, key=lambda i: (ref.value(i), i)))
    assert removed == ref.removed and [len(c) for c in calls] == [6, 5, 4, 3]


def test_rounds_one_shot_and_rescore_top():
    removed, calls = _drive("one-shot", None, 3)
    assert removed == sorted(BASE, key=lambda i: (BASE[i], i))[:3] and len(calls) == 1
    removed, calls = _drive("iterative", 2, 3)
    assert [len(c) for c in calls] == [6, 2, 2]
    first = sorted(BASE, key=lambda i: (BASE[i], i))
    assert set(calls[1]) == set([i for i in first if i != removed[0]][:2])
    assert _drive("iterative", 6, 4)[0] == _drive("iterative", None, 4)[0]  # K >= candidates: the full schedule
    with pytest.raises(InputError, match="--rescore-top"):
        next(rounds(lambda: {"a": 1}, lambda c: None, rescore_top=0))


def test_pipeline_public_names():
    for name in ("Source", "Outcome", "Written", "open_model", "check_output", "run", "write", "write_report",
                 "prune", "inspect"):
        assert hasattr(pipeline, name), name
    assert pyinspect.signature(pipeline.prune).parameters["data_options"].default is None


def test_eligible_now_only_exclude_and_keep_per_stage():
    from onnx_consensus.schedule import allowed_ids, eligible_now

    stages = {"a": 0, "b": 0, "c": 1, "d": 1, "e": 1}
    assert allowed_ids(stages, (), ("b",)) == {"a", "c", "d", "e"} and allowed_ids(stages, ("a", "c"), ("c",)) == {"a"}
    current = {i: i.upper() for i in ("a", "b", "d", "e")}  # "c" is gone from the current model
    # stage 0 has 2 left, stage 1 has 2 left (c removed): with K=1 both stages may lose one more
    assert eligible_now(current, stages, {"c"}, set(stages), 1) == {"a": "A", "b": "B", "d": "D", "e": "E"}
    assert eligible_now(current, stages, {"c"}, set(stages), 2) == {}
    assert list(eligible_now(current, stages, {"c"}, {"e", "a"}, 0)) == ["a", "e"]  # the current order kept
