"""The staged decoder criterion (``llm.staged``): with every candidate rescored it is the exact global criterion
(``llm.scoring.score_layers``: same scores, same order, round after round); the hidden states it carries from
round to round equal a fresh run of the pruned model; with one candidate rescored the winner is the prescreen's
(Block Influence) lowest and each round after the first runs one suffix and no full pass."""
from __future__ import annotations

import math

import numpy as np
import pytest

from onnx_consensus.graph.decoder import FUSED, PLAIN, expose_residual_sums, find_decoder_layers
from onnx_consensus.graph.instrument import with_outputs
from onnx_consensus.graph.ir import load_model
from onnx_consensus.llm.scoring import original_logits, score_layers
from onnx_consensus.llm.staged import StagedScorer
from tests.test_decoder_llm import D, L, V, synthetic_decoder

METRICS = ("cosine", "cka", "output_kl")


def _work(form):
    model = synthetic_decoder(form)
    return expose_residual_sums(model) if form == FUSED else model


def _exact_rounds(work, ids, n_rounds):
    report = find_decoder_layers(work)
    ref = original_logits(work, ids, batch_size=2)
    removed, out = [], []
    for _ in range(n_rounds):
        r = score_layers(work, report, ids, removed=removed, metrics=METRICS, reference=ref, batch_size=2)
        out.append((r.order, {b.id: b.scores for b in r.blocks}))
        removed.append(report.by_id()[r.order[0]].index)
    return out


def _staged_rounds(work, ids, n_rounds, top_k, metrics=METRICS):
    report = find_decoder_layers(work)
    scorer = StagedScorer(work, report, ids, top_k=top_k, metrics=metrics, batch_size=2)
    removed, out = [], []
    for _ in range(n_rounds):
        r = scorer.round(removed, list(report.by_index()))
        out.append(r)
        removed.append(report.by_id()[r.order[0]].index)
    return out, scorer


@pytest.mark.parametrize("form", [PLAIN, FUSED])
def test_all_candidates_rescored_is_the_exact_global_criterion(form):
    work = _work(form)
    ids = np.random.default_rng(3).integers(0, V, (5, 6))  # 3 batches of 2: the last one short
    exact = _exact_rounds(work, ids, 3)
    staged, scorer = _staged_rounds(work, ids, 3, top_k=99)
    for (order, scores), r in zip(exact, staged, strict=True):
        assert r.order == order
        for b in r.blocks:
            for m in METRICS:
                assert math.isclose(b.scores[m], scores[b.id][m], rel_tol=1e-4, abs_tol=1e-6), (b.id, m)
    assert [r.full_runs for r in staged] == [1, 0, 0]  # the first round's pass only: later rounds carry it
    assert scorer.full_runs == 1


@pytest.mark.parametrize("form", [PLAIN, FUSED])
def test_carried_hidden_states_equal_a_fresh_run(form):
    work = _work(form)
    report = find_decoder_layers(work)
    ids = np.random.default_rng(5).integers(0, V, (4, 7))
    _, carried = _staged_rounds(work, ids, 3, top_k=99, metrics=("output_kl",))
    removed = carried.removed  # two layers removed, values carried twice
    assert len(removed) == 2
    fresh = StagedScorer(work, report, ids, top_k=99, metrics=("output_kl",), batch_size=2)
    fresh.round(removed, [i for i in report.by_index() if i not in removed])
    stream = fresh._boundaries(removed)
    assert fresh.full_runs == 1 and carried.full_runs == 1
    assert set(stream) <= set(carried.cache) & set(fresh.cache)
    for name in set(carried.cache) & set(fresh.cache):
        for a, b in zip(carried.cache[name], fresh.cache[name], strict=True):
            np.testing.assert_allclose(carried.store.get(a), fresh.store.get(b), rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(carried.predicted, fresh.predicted)


def test_one_rescored_candidate_is_the_block_influence_choice():
    work = _work(PLAIN)
    report = find_decoder_layers(work)
    ids = np.random.default_rng(6).integers(0, V, (4, 6))
    staged, _ = _staged_rounds(work, ids, 2, top_k=1, metrics=("output_kl",))
    by_index = report.by_index()
    # independent: Block Influence of the original model's layers from a plain local-scope run
    local = score_layers(work, report, ids, metrics=("cosine",), scope="local", batch_size=2)
    assert staged[0].order[0] == local.order[0]
    assert staged[0].blocks[0].scores["prescreen_cosine"] == pytest.approx(local.blocks[0].scores["cosine"], 1e-6)
    assert [r.rescored for r in staged] == [1, 1]
    assert [(r.full_runs, r.suffix_runs) for r in staged] == [(1, 1), (0, 1)]
    first = staged[0].blocks[0].position
    assert sorted(b.position for b in staged[1].blocks) == sorted(i for i in by_index if i != first)


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_staged_on_the_genai_builder_export(tiny, precision):
    model = expose_residual_sums(load_model(str(tiny / "llama" / f"genai_{precision}" / "model.onnx")))
    ids = np.random.default_rng(4).integers(0, 250, (3, 16))
    exact = _exact_rounds(model, ids, 2)
    staged, scorer = _staged_rounds(model, ids, 2, top_k=99)
    assert [r.order for r in staged] == [order for order, _ in exact]
    assert scorer.full_runs == 1


def test_which_runs_are_staged():
    from dataclasses import replace

    from onnx_consensus.errors import InputError
    from onnx_consensus.llm.staged import staged_scorer
    from onnx_consensus.options import DECODER_PRESCREEN, CriterionOptions

    work = _work(PLAIN)
    report = find_decoder_layers(work)
    ids = np.random.default_rng(7).integers(0, V, (2, 5))
    kw = dict(metrics=("output",), scope="global", seed=0, pca_dim=256, batch_size=2, threads=None, weights={})
    crit = CriterionOptions()
    assert crit.prescreen is None and staged_scorer(work, report, ids, crit, kw).top_k == DECODER_PRESCREEN
    assert staged_scorer(work, report, ids, replace(crit, prescreen=2), kw).top_k == 2
    assert staged_scorer(work, report, ids, replace(crit, prescreen=0), kw) is None  # the exact criterion
    assert staged_scorer(work, report, ids, replace(crit, scope="local"), kw) is None
    assert staged_scorer(work, report, ids, replace(crit, prescreen=len(report.layers)), kw) is None
    with pytest.raises(InputError, match="--prescreen"):
        staged_scorer(work, report, ids, replace(crit, prescreen=-1), kw)


def _hold_both(current, sx):
    from onnx_consensus.llm.held import HeldAs
    return {c: HeldAs(c) for c in sx.cut}  # every cut tensor held as itself (the code before llm.held)


@pytest.mark.parametrize("metrics", [("output_kl",), METRICS])
def test_held_values_are_the_boundaries_and_change_no_score(monkeypatch, metrics):
    """Fused form: besides the small side tensors the scorer holds the L + 1 boundaries (and the final hidden
    state when a metric reads it), not the skip-norm pairs they sum; the scores are bit for bit those of
    holding every cut tensor."""
    work = _work(FUSED)
    report = find_decoder_layers(work)
    ids = np.random.default_rng(8).integers(0, V, (5, 6))
    staged, scorer = _staged_rounds(work, ids, 3, top_k=2, metrics=metrics)
    first = StagedScorer(work, report, ids, top_k=2, metrics=metrics, batch_size=2)
    first.round([], list(report.by_index()))
    stream = first._boundaries([])
    assert len(stream) == L + 1
    wide = {n for n, parts in first.cache.items() if parts[0].shape == (2, 6, D)}
    assert wide == {*stream, *([first.feature] if len(metrics) > 1 else [])}
    per_tensor = ids.size * D * 4  # every window's tokens, float32
    assert len(wide) * per_tensor <= first.held_bytes() < (len(wide) + 1) * per_tensor

    monkeypatch.setattr("onnx_consensus.llm.staged.fed_from", _hold_both)
    before, both = _staged_rounds(work, ids, 3, top_k=2, metrics=metrics)
    assert [r.order for r in staged] == [r.order for r in before]
    assert [[b.scores for b in r.blocks] for r in staged] == [[b.scores for b in r.blocks] for r in before]
    assert [(r.full_runs, r.suffix_runs) for r in staged] == [(r.full_runs, r.suffix_runs) for r in before]
    assert [r.held_bytes for r in staged] < [r.held_bytes for r in before]
    assert staged[-1].to_json()["staged"]["held_bytes"] == scorer.held_bytes()


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_a_pair_fed_from_its_sum_computes_the_same_bits(tiny, precision):
    """The genai export's skip-norm pair (input, skip) and (their sum, 0) give the candidate's suffix the same
    logits and stream, bit for bit (``llm.held``), for every candidate fed that way."""
    from onnx_consensus.llm.held import fed_from, held_feed
    from onnx_consensus.llm.suffix import cut_suffix, node_signatures
    from onnx_consensus.runtime import make_session

    model = expose_residual_sums(load_model(str(tiny / "llama" / f"genai_{precision}" / "model.onnx")))
    report = find_decoder_layers(model)
    scorer = StagedScorer(model, report, np.random.default_rng(9).integers(0, 250, (2, 12)), top_k=99,
                          metrics=("output_kl",), batch_size=2)
    scorer.round([], list(report.by_index()))
    current = scorer._skeleton([])
    signatures = node_signatures(current)
    paired = 0
    for i in report.by_index():
        sx = cut_suffix(scorer._skeleton([i]), signatures, [scorer.lg, *scorer._boundaries([i])[i + 1:]])
        how = fed_from(current, sx)
        if not any(h.zero for h in how.values()):
            continue
        paired += 1
        # the pair itself, from a run of the current model
        pair = [c for c in sx.cut if how[c].source != c]
        whole = scorer._run(with_outputs(scorer.model, pair), scorer.feeds, pair).whole
        direct = {**{n: scorer.feeds[0][n] for n in sx.inputs}, **held_feed(scorer.cache, how, 0, scorer.store),
                  **{c: scorer.store.get(whole[c][0]) for c in pair}}
        summed = {**{n: scorer.feeds[0][n] for n in sx.inputs}, **held_feed(scorer.cache, how, 0, scorer.store)}
        sess = make_session(sx.materialize(scorer.model, direct), level="basic", arena=False)
        for a, b in zip(sess.run(None, direct), sess.run(None, summed), strict=True):
            np.testing.assert_array_equal(a, b)
    assert paired == len(report.layers) - 1  # every layer but the first (whose cut is the embedding)


def test_a_skip_norm_with_a_bias_keeps_its_pair():
    """A skip-norm with a bias sums input + skip + bias: its sum output is not what (input, skip) add to, so both
    inputs stay held (and the staged scores are still the exact criterion's)."""
    import onnx

    from onnx_consensus.llm.held import fed_from
    from onnx_consensus.llm.suffix import cut_suffix, node_signatures

    work = _work(FUSED)
    work.graph.initializer.append(onnx.numpy_helper.from_array(np.full(D, 0.25, np.float32), "skip_bias"))
    for n in work.graph.node:
        if n.op_type == "SkipSimplifiedLayerNormalization":
            n.input.append("skip_bias")
    report = find_decoder_layers(work)
    ids = np.random.default_rng(10).integers(0, V, (4, 6))
    scorer = StagedScorer(work, report, ids, top_k=99, metrics=("output_kl",), batch_size=2)
    current = scorer._skeleton([])
    sx = cut_suffix(scorer._skeleton([2]), node_signatures(current), [scorer.lg])
    assert len(sx.cut) >= 2  # the pair of the norm opening layer 3
    assert all(h.source == c and not h.zero for c, h in fed_from(current, sx).items())
    exact = _exact_rounds(work, ids, 2)
    staged, _ = _staged_rounds(work, ids, 2, top_k=99, metrics=("output_kl",))
    assert [r.order for r in staged] == [order for order, _ in exact]
    for (_, scores), r in zip(exact, staged, strict=True):
        for b in r.blocks:
            assert math.isclose(b.scores["output_kl"], scores[b.id]["output_kl"], rel_tol=1e-4, abs_tol=1e-6)


def test_held_store_gives_back_what_it_was_given():
    """``llm.held.HeldStore``: values written to its temporary file come back equal (dtype, shape, bytes), in any
    order, and the file has no name on disk."""
    import os

    from onnx_consensus.llm.held import HeldStore

    rng = np.random.default_rng(3)
    values = [rng.standard_normal((2, 5, 7)).astype(np.float32), rng.integers(0, 9, (4,)), np.zeros((0, 3)), np.int64(7),
              rng.standard_normal((3, 2)).astype(np.float16), np.asfortranarray(rng.standard_normal((6, 4)))]
    store = HeldStore()
    handles = [store.put(v) for v in values]
    assert sum(h.nbytes for h in handles) == sum(v.nbytes for v in values)
    for h, v in reversed(list(zip(handles, values))):
        got = store.get(h)
        assert got.dtype == v.dtype and got.shape == np.shape(v)  # a 0-d value stays 0-d
        np.testing.assert_array_equal(got, v)
    assert os.fstat(store._file.fileno()).st_nlink == 0  # unlinked: nothing left behind after a crash
    store.close()


def test_a_full_temporary_folder_is_refused_before_the_run_fills_it(monkeypatch):
    """The held values need room in TMPDIR: with too little free, the staged scorer stops after the first batch
    with one line naming the folder and what to do, instead of failing midway on a full disk."""
    import collections
    import shutil

    from onnx_consensus.errors import InputError

    model = synthetic_decoder(PLAIN)
    report = find_decoder_layers(model)
    scorer = StagedScorer(model, report, np.random.default_rng(2).integers(0, V, (4, 6)), top_k=2,
                          metrics=("output_kl",), batch_size=2)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    with pytest.raises(InputError, match="TMPDIR"):
        scorer.round([], list(report.by_index()))
    monkeypatch.undo()
    assert scorer.round([], list(report.by_index())).order  # with room, the same scorer runs
    scorer.close()
