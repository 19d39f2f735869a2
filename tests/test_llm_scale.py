"""Decoder-layer scoring from cached inputs (issue 25): each candidate runs only the part of its model after the
layer (``llm.suffix``), fed with the current model's values; the scores and orders must be those of running
every candidate's whole model (the code before issue 25, kept as the fallback), round after round."""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

from onnx_consensus.graph.decoder import FUSED, PLAIN, expose_residual_sums, find_decoder_layers
from onnx_consensus.graph.ir import load_model
from onnx_consensus.graph.kv_surgery import remove_layers
from onnx_consensus.llm import scoring as llm_scoring
from onnx_consensus.llm.perplexity import logits_name
from onnx_consensus.llm.scoring import final_hidden, original_logits, score_layers
from onnx_consensus.llm.suffix import cut_suffix, node_signatures
from onnx_consensus.graph.instrument import with_outputs
from tests.test_decoder_llm import V, synthetic_decoder

METRICS = ("cosine", "cka", "linear_1", "output_kl")


def _whole_models(monkeypatch):
    """Score as before issue 25: every candidate's whole model."""
    monkeypatch.setattr(llm_scoring, "candidate_suffixes",
                        lambda model, current, report, removed, candidates, outputs: {i: None for i in candidates})


def _rounds(work, ids, n_rounds: int, batch_size: int = 2) -> list:
    """Iterative schedule: score, remove the first of the order, repeat; the rounds' (order, scores)."""
    report = find_decoder_layers(work)
    ref = original_logits(work, ids, batch_size=batch_size)
    removed, out = [], []
    for _ in range(n_rounds):
        r = score_layers(work, report, ids, removed=removed, metrics=METRICS, reference=ref, batch_size=batch_size)
        out.append((r.order, {b.id: b.scores for b in r.blocks}))
        removed.append(report.by_id()[r.order[0]].index)
    return out


def _same(fast: list, slow: list) -> None:
    for (order_f, sf), (order_s, ss) in zip(fast, slow, strict=True):
        assert order_f == order_s
        for bid in sf:
            for m in METRICS:
                assert math.isclose(sf[bid][m], ss[bid][m], rel_tol=1e-4, abs_tol=1e-6), (bid, m)


@pytest.mark.parametrize("form", [PLAIN, FUSED])
def test_suffix_scores_equal_whole_model_scores(form, monkeypatch):
    model = synthetic_decoder(form)
    work = expose_residual_sums(model) if form == FUSED else model
    ids = np.random.default_rng(3).integers(0, V, (5, 6))  # 3 batches of 2: the last one short
    fast = _rounds(work, ids, 3)
    _whole_models(monkeypatch)
    _same(fast, _rounds(work, ids, 3))


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_suffix_scores_on_the_genai_builder_export(tiny, precision, monkeypatch):
    model = expose_residual_sums(load_model(str(tiny / "llama" / f"genai_{precision}" / "model.onnx")))
    ids = np.random.default_rng(4).integers(0, 250, (3, 16))
    report = find_decoder_layers(model)
    outs = [final_hidden(model), logits_name(model)]
    current = with_outputs(model, outs[:1])
    sx = llm_scoring.candidate_suffixes(current, current, report, [], list(report.by_index()), outs)
    assert all(s is not None and len(s.model.graph.node) < len(model.graph.node) for s in sx.values())
    fast = _rounds(model, ids, 2)
    _whole_models(monkeypatch)
    _same(fast, _rounds(model, ids, 2))


@pytest.mark.parametrize("form", [PLAIN, FUSED])
def test_suffix_is_the_part_after_the_layer(form):
    """Removing the last layer leaves only the final norm (and the head) to run; removing the first, every other
    layer; the cut is the stream before the layer (and, fused, the opening norm's inputs) plus side tensors."""
    model = synthetic_decoder(form)
    work = expose_residual_sums(model) if form == FUSED else model
    report = find_decoder_layers(work)
    outs = [final_hidden(work), logits_name(work)]
    current = with_outputs(work, outs[:1])
    sig = node_signatures(current)
    sizes = {}
    for i in report.by_index():
        pruned = remove_layers(current, [i], report=report)
        sx = cut_suffix(pruned, sig, outs)
        assert sx is not None and set(sx.cut).isdisjoint(outs)
        sizes[i] = len(sx.model.graph.node)
        assert not set(sx.cut) & {o for n in sx.model.graph.node for o in n.output}
        if form == PLAIN:
            assert report.by_index()[i].block.entry in sx.cut
    assert sizes == dict(sorted(sizes.items(), key=lambda kv: -kv[1]))  # later layers: shorter suffixes
    assert sizes[max(sizes)] < len(current.graph.node) / 8
    assert not any(isinstance(t, onnx.TensorProto) for t in sx.model.graph.initializer)  # no weights held


def _constants_as_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its non-weight initializers (scalars, axes) as ``Constant`` nodes, as optimum writes them."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    small = [t for t in out.graph.initializer if np.prod(t.dims) <= 1]
    consts = [onnx.helper.make_node("Constant", [], [t.name], name=f"c_{t.name}", value=t) for t in small]
    for t in consts:
        t.attribute[0].t.ClearField("name")  # as the torch exporter leaves them
    keep = [t for t in out.graph.initializer if np.prod(t.dims) > 1]
    out.graph.ClearField("initializer")
    out.graph.initializer.extend(keep)
    nodes = [*consts, *out.graph.node]
    out.graph.ClearField("node")
    out.graph.node.extend(nodes)
    return out


def test_suffix_with_constant_nodes_is_the_part_after_the_layer():
    """A graph with ``Constant`` nodes (optimum's exports: every scalar): a removal leaves them equal, so a
    candidate's suffix is still the part after its layer, not the whole model (the staged criterion ran every
    candidate's whole model on optimum exports: ``remove_layers`` set the Constants' absent tensor names)."""
    model = _constants_as_nodes(synthetic_decoder(PLAIN))
    assert any(n.op_type == "Constant" for n in model.graph.node)
    report = find_decoder_layers(model)
    outs = [final_hidden(model), logits_name(model)]
    current = with_outputs(model, outs[:1])
    sig = node_signatures(current)
    last = max(report.by_index())
    before = current.SerializeToString()
    for i in (last, min(report.by_index()), last):  # a removal before the last one's changes nothing
        sx = cut_suffix(remove_layers(current, [i], report=report), sig, outs)
        assert current.SerializeToString() == before  # the Constants' tensors keep their (absent) names
        assert sx is not None and report.by_index()[i].block.entry in sx.cut
        if i == last:
            assert len(sx.model.graph.node) < len(current.graph.node) / 8


def test_suffix_scores_with_constant_nodes_equal_whole_model_scores(monkeypatch):
    model = _constants_as_nodes(synthetic_decoder(PLAIN))
    ids = np.random.default_rng(5).integers(0, V, (4, 6))
    fast = _rounds(model, ids, 2)
    _whole_models(monkeypatch)
    _same(fast, _rounds(model, ids, 2))


def test_rescore_top_scores_only_the_best_of_the_previous_round(tmp_path):
    """``--rescore-top K`` on a decoder: round 1 scores every layer, later rounds only the K best still there;
    with K at least the number of layers, the removals are those of the full schedule."""
    import json

    from onnx_consensus.cli import main
    from tests.test_llm_prune import _text, _tokenizer

    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(synthetic_decoder(PLAIN), str(src / "model.onnx"))
    _tokenizer(src / "tokenizer.json")
    (tmp_path / "calib.txt").write_text(_text(400))

    def rounds(*extra):
        rep = tmp_path / f"r{len(extra)}{'_'.join(extra)}.json"
        out = tmp_path / f"o{len(extra)}{'_'.join(extra)}"
        assert main([str(src), str(out), "--calib", str(tmp_path / "calib.txt"), "--seq-len", "8", "--remove", "3",
                     "--report", str(rep), "-q", "--no-latency", *extra]) == 0
        r = json.loads(rep.read_text())
        return [x["index"] for x in r["removed"]], [len(x["blocks"]) for x in r["rounds"]], r["rounds"]

    full, sizes, full_rounds = rounds()
    assert sizes == [4, 3, 2]
    same, sizes_all, _ = rounds("--rescore-top", "4")
    assert same == full and sizes_all == [4, 3, 2]
    top2, sizes2, r2 = rounds("--rescore-top", "2")
    assert sizes2 == [4, 2, 2] and top2[0] == full[0]
    first = [b["id"] for b in full_rounds[0]["blocks"]]
    assert {b["id"] for b in r2[1]["blocks"]} == set([i for i in first if i != first[0]][:2])
    assert main([str(src), str(tmp_path / "bad"), "--calib", str(tmp_path / "calib.txt"), "--seq-len", "8",
                 "--remove", "1", "--rescore-top", "0", "-q", "--no-latency"]) != 0


def test_release_mapped_pages_keeps_values(tmp_path):
    """The shared maps of external weights drop their resident pages and still read the same values."""
    from onnx_consensus.graph.ir import load_model_and_layout
    from onnx_consensus.graph.weights import external_array, release_mapped_pages

    model = synthetic_decoder(PLAIN)
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, size_threshold=0)
    loaded, external = load_model_and_layout(str(tmp_path / "m.onnx"))
    assert external
    before = {t.name: np.array(external_array(t)) for t in loaded.graph.initializer}
    assert release_mapped_pages() > 0
    for t in loaded.graph.initializer:
        np.testing.assert_array_equal(external_array(t), before[t.name])


@pytest.mark.parametrize("form", [PLAIN, FUSED])
def test_angular_local_is_gromovs_angular_distance(form):
    """``--metrics angular --scope local`` (Gromov et al. 2024 with n = 1, as PruneMe computes it per token):
    mean over tokens of arccos(cos(layer input, layer output)) / pi, recomputed here from the exposed stream."""
    from onnx_consensus.graph.decoder import prefill_feed
    from onnx_consensus.runtime import make_session

    model = synthetic_decoder(form)
    work = expose_residual_sums(model) if form == FUSED else model
    report = find_decoder_layers(work)
    ids = np.random.default_rng(5).integers(0, V, (3, 7))
    r = score_layers(work, report, ids, metrics=("angular", "cosine"), scope="local")
    layers = report.by_index()
    names = [layers[0].block.entry] + [layers[i].block.exit for i in sorted(layers)]
    m = with_outputs(work, names)
    acts = dict(zip(names, make_session(m).run(names, prefill_feed(m, ids))))
    for b in r.blocks:
        i = report.by_id()[b.id].index
        x = acts[names[i]].reshape(-1, acts[names[i]].shape[-1]).astype(np.float64)
        y = acts[names[i + 1]].reshape(x.shape).astype(np.float64)
        cos = np.clip((x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1), -1, 1)
        assert math.isclose(b.scores["angular"], float(np.mean(np.arccos(cos)) / np.pi), rel_tol=1e-6)
        assert math.isclose(b.scores["cosine"], float(1 - cos.mean()), rel_tol=1e-6, abs_tol=1e-9)
    alone = score_layers(work, report, ids, metrics=("angular",), scope="local")
    assert [b.scores["angular"] for b in alone.blocks] == sorted(b.scores["angular"] for b in alone.blocks)


@pytest.mark.parametrize("as_folder", [True, False])
def test_inline_weights_are_spilled_and_written_back_inline(tmp_path, monkeypatch, as_folder):
    """An input with inline weights over the threshold runs on a temporary data file (the weights mapped, not
    copied) and is written inline again: the same files and logits as without the spill."""
    from onnx_consensus.cli import main
    from onnx_consensus.graph.decoder import prefill_feed
    from onnx_consensus.llm import run as llm_run
    from onnx_consensus.llm import spill as llm_spill
    from onnx_consensus.runtime import make_session
    from tests.test_llm_prune import _text, _tokenizer

    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(synthetic_decoder(FUSED), str(src / "model.onnx"))
    _tokenizer(src / "tokenizer.json")
    (tmp_path / "calib.txt").write_text(_text(300))
    before = (src / "model.onnx").read_bytes()
    spilled = []
    real = llm_spill.spill_weights
    monkeypatch.setattr(llm_run, "spill_weights", lambda m, b: spilled.append(real(m, 0)) or spilled[-1])

    def prune(name, spill):
        if not spill:
            monkeypatch.setattr(llm_run, "spill_weights", lambda m, b: (m, None))
        out = tmp_path / name if as_folder else tmp_path / f"{name}.onnx"
        assert main([str(src if as_folder else src / "model.onnx"), str(out), "--calib", str(tmp_path / "calib.txt"),
                     "--seq-len", "8", "--remove", "2", "-q", "--no-latency"] +
                    ([] if as_folder else ["--tokenizer", str(src / "tokenizer.json")])) == 0
        return out / "model.onnx" if as_folder else out

    a = prune("spilled", True)
    assert spilled and spilled[0][1] is not None
    b = prune("plain", False)
    assert (src / "model.onnx").read_bytes() == before
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".data", ".bin")]  # every output inline
    ma, mb = onnx.load(str(a)), onnx.load(str(b))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in ma.graph.initializer)
    ids = np.random.default_rng(2).integers(0, V, (2, 5))
    np.testing.assert_allclose(make_session(ma).run(["logits"], prefill_feed(ma, ids))[0],
                               make_session(mb).run(["logits"], prefill_feed(mb, ids))[0], rtol=1e-6, atol=1e-6)


def test_scale_table_keeps_genai_and_optimum_rows_apart(tmp_path):
    """tools.bench.llm_scale: a genai and an optimum result of the same size, criterion and code are two rows, the
    optimum one named so; a later line of the same model replaces the earlier one."""
    from tools.bench.llm_scale import table

    def res(exporter, cpu, label="x"):
        r = {"wall_s": 2.0, "cpu_s": cpu, "peak_rss": 1e9, "rc": 0, "removed": [7, 6], "wall_x_floor": 2.0,
             "cpu_x_floor": cpu, "rss_x_file": 10.0}
        out = {"size": "s", "precision": "fp32", "params": 25e6, "file_bytes": 1e8, "code": "/c", "label": label,
               "floor": {"floor_s": 1.0, "floor_cpu_s": 1.0}, "default": r}
        return {**out, "exporter": exporter} if exporter else out  # lines written before --exporter have none

    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (res(None, 3.0), res("optimum", 5.0),
                                                             res("optimum", 7.0))))
    rows = [r for r in table([str(path)]).splitlines() if r.startswith("| 512/8")]
    assert len(rows) == 2
    assert rows[0].startswith("| 512/8 fp32 | ") and "| 3 (3.0x) |" in rows[0]
    assert rows[1].startswith("| 512/8 fp32 optimum | ") and "| 7 (7.0x) |" in rows[1]


def test_log_likelihood_window_by_window_equals_a_direct_log_softmax():
    """``perplexity.log_likelihood`` works one window at a time (bounded float64 copies): the same sum as
    scipy's log_softmax over the whole (b, s, V) array."""
    from scipy.special import log_softmax

    from onnx_consensus.llm.perplexity import log_likelihood

    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((3, 6, 50)) * 4).astype(np.float32)
    ids = rng.integers(0, 50, (3, 6))
    ref = np.take_along_axis(log_softmax(logits[:, :-1].astype(np.float64), -1), ids[:, 1:, None], -1).sum()
    total, count = log_likelihood(logits, ids)
    assert count == 15 and math.isclose(total, ref, rel_tol=1e-12)


def test_staged_scores_do_not_depend_on_the_batch():
    """The decoder batch (``llm.batching``: windows per run, bounded by tokens) changes memory, not scores: the
    staged rounds with 1 window a batch equal those with all 5 at once."""
    from onnx_consensus.llm.staged import StagedScorer

    model = synthetic_decoder(PLAIN)
    report = find_decoder_layers(model)
    ids = np.random.default_rng(8).integers(0, V, (5, 6))
    rounds = []
    for batch in (1, 5):
        scorer = StagedScorer(model, report, ids, top_k=2, metrics=("output_kl",), batch_size=batch)
        removed, got = [], []
        for _ in range(2):
            r = scorer.round(removed, [i for i in report.by_index() if i not in removed])
            got.append((r.order, {b.id: b.scores for b in r.blocks}))
            removed.append(report.by_id()[r.order[0]].index)
        scorer.close()
        rounds.append(got)
    for (order_a, sa), (order_b, sb) in zip(*rounds, strict=True):
        assert order_a == order_b
        for bid, scores in sa.items():
            for m, v in scores.items():
                assert math.isclose(v, sb[bid][m], rel_tol=1e-4, abs_tol=1e-6), (bid, m)
