"""Output-level scores (metrics.output): closed forms, token rows, several outputs, and the anchor to the
ORIGINAL model's outputs across removals; presets and the weighted rank sum."""
import numpy as np
import onnx
import pytest

from onnx_consensus.consensus import consensus
from onnx_consensus.data import load_calibration
from onnx_consensus.errors import InputError
from onnx_consensus.graph.blocks import find_blocks
from onnx_consensus.graph.surgery import remove_blocks
from onnx_consensus.metrics import PAPER_METRICS, resolve_metrics, score
from onnx_consensus.metrics.output import OutputAccumulator, output_rows
from onnx_consensus.options import CriterionOptions, RunOptions, TargetOptions
from onnx_consensus.pruner import prune
from onnx_consensus.scoring import score_blocks
from tests.helpers import residual_mlp, run


def test_kl_closed_form():
    p = np.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    q = np.array([[0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    want = np.mean((p * np.log(p / q)).sum(1))
    # logits defined up to a constant per row: shift them
    assert score("output_kl", np.log(p) + 3.0, np.log(q) - 1.0) == pytest.approx(want, rel=1e-12)


def test_identical_outputs_score_zero():
    X = np.random.default_rng(0).standard_normal((50, 7))
    for m in ("output_kl", "output_agreement", "output_mse", "output_cosine"):
        assert score(m, X, X.copy()) == pytest.approx(0.0, abs=1e-12), m


def test_agreement_mse_cosine_closed_forms():
    X = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 3.0]])
    Y = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 2.0], [3.0, 1.0]])  # rows 0, 2, 3 change their top-1
    assert score("output_agreement", X, Y) == pytest.approx(0.75)
    assert score("output_cosine", X, -X) == pytest.approx(2.0)
    assert score("output_cosine", X[:2], X[:2][:, ::-1]) == pytest.approx(1.0)  # orthogonal rows
    # MSE in units of the output's variance: predicting the mean of the values scores 1
    assert score("output_mse", X, np.full_like(X, X.mean())) == pytest.approx(1.0)
    assert score("output_mse", X, X + 0.5) == pytest.approx(0.25 / X.var())


def test_token_rows_and_several_outputs():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 4, 5))
    keep = np.array([[True, True, False, False], [True, True, True, False]])
    assert output_rows(logits, keep).shape == (5, 5)
    other = logits.copy()
    other[~keep] += 100.0  # padding tokens: ignored
    acc = OutputAccumulator(["output_kl", "output_cosine"])
    acc.add("tok", output_rows(logits, keep), output_rows(other, keep), True)
    assert acc.scores()["output_kl"] == pytest.approx(0.0, abs=1e-12)
    emb = rng.standard_normal((6, 3))
    acc.add("emb", output_rows(emb), output_rows(-emb), False)  # not class scores: cosine only
    got = acc.scores()
    assert got["output_kl"] == pytest.approx(0.0, abs=1e-12)
    assert got["output_cosine"] == pytest.approx((0.0 + 2.0) / 2)  # mean over the two outputs


def test_presets():
    assert resolve_metrics(["paper"]) == PAPER_METRICS
    assert resolve_metrics(["paper+output"]) == PAPER_METRICS + ("output_kl",)
    assert resolve_metrics(["output+output_agreement"]) == ("output_kl", "output_agreement")
    assert resolve_metrics(["output"], class_scores=False) == ("output_mse", "output_cosine")
    assert resolve_metrics(["cka+output_kl", "cka"]) == ("cka", "output_kl")
    with pytest.raises(InputError):
        resolve_metrics(["papr"])
    with pytest.raises(InputError, match="no metric given"):
        resolve_metrics([])


def test_default_criterion_by_condition():
    """--metrics not given (None): output without fine-tuning, paper+output when the pruned model is fine-tuned;
    the API's pruner, which does not know, takes the no-fine-tuning default."""
    from onnx_consensus.options import CriterionOptions, default_criterion
    assert CriterionOptions().metrics is None
    assert resolve_metrics(None) == ("output_kl",)
    assert resolve_metrics(None, class_scores=False) == ("output_mse", "output_cosine")
    assert resolve_metrics(default_criterion(False)) == ("output_kl",)
    assert resolve_metrics(default_criterion(True)) == PAPER_METRICS + ("output_kl",)


def test_weighted_rank_sum_and_ties():
    scores = {"a": {"m": 1.0, "n": 3.0}, "b": {"m": 2.0, "n": 2.0}, "c": {"m": 3.0, "n": 1.0}}
    assert [s.id for s in consensus(scores)] == ["b", "a", "c"]  # sums tie at 4: smaller worst rank (b), then position
    assert [s.id for s in consensus(scores, weights={"m": 3.0})] == ["a", "b", "c"]
    assert [s.id for s in consensus(scores, weights={"m": 0.0})] == ["c", "b", "a"]  # n alone
    with pytest.raises(InputError):
        consensus(scores, weights={"x": 1.0})


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    d = tmp_path_factory.mktemp("outmetrics")
    x = np.random.default_rng(3).standard_normal((40, 16)).astype(np.float32)
    np.save(d / "x.npy", x)
    model = residual_mlp(6)
    return model, load_calibration(d, model), x


def _kl_vs(model, ref_logits, x):
    return score("output_kl", ref_logits.astype(np.float64), run(model, {"x": x})[0].astype(np.float64))


def test_round_one_scores_equal_pruned_models(mlp):
    model, data, x = mlp
    ref = run(model, {"x": x})[0]
    rnd = score_blocks(model, data, metrics=["output_kl", "output_mse"], batch_size=16)
    for b in find_blocks(model).blocks:
        got = next(s for s in rnd.blocks if s.id == b.id).scores
        assert got["output_kl"] == pytest.approx(_kl_vs(remove_blocks(model, [b]), ref, x), rel=1e-4, abs=1e-7)


def test_reference_is_the_original_after_a_removal(mlp):
    model, data, x = mlp
    res = prune(model, data, criterion=CriterionOptions(metrics=("output_kl",)), target=TargetOptions(remove=2),
                run=RunOptions(holdout=0.25, batch_size=8))
    first = find_blocks(model).by_id()[res.removed_ids[0]]
    score_idx, _ = data.split(0.25, seed=0)
    xs = x[score_idx]
    ref = run(model, {"x": xs})[0]
    current = remove_blocks(model, [first])
    cur_ref = run(current, {"x": xs})[0]
    blocks = {b.id: b for b in find_blocks(current).blocks}
    differs = False
    for s in res.rounds[1].blocks:
        both = remove_blocks(model, [first, blocks[s.id]])
        want = _kl_vs(both, ref, xs)
        assert s.scores["output_kl"] == pytest.approx(want, rel=1e-4, abs=1e-7)
        differs |= abs(_kl_vs(both, cur_ref, xs) - want) > 1e-4
    assert differs  # the test can tell the original's outputs from the current model's


def test_output_metric_needs_global_scope(mlp):
    model, data, _ = mlp
    with pytest.raises(InputError):
        score_blocks(model, data, metrics=["output_kl"], scope="local")


def test_output_kl_without_class_scores_is_an_input_error(tmp_path):
    model = residual_mlp(3)
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 1  # declared (N, 1): not class scores
    w = [i for i in model.graph.initializer if i.name == "head"][0]
    w.CopyFrom(onnx.numpy_helper.from_array(np.ones((16, 1), np.float32), "head"))
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((12, 16)).astype(np.float32))
    data = load_calibration(tmp_path, model)
    # a regression value: the per-kind measure (per-channel standardised error), no longer mse + cosine
    assert score_blocks(model, data, metrics=["output"]).metrics == ("output_fidelity",)
    with pytest.raises(InputError):
        score_blocks(model, data, metrics=["output_kl"])


def test_rescore_top(mlp):
    model, data, _ = mlp
    kw = dict(criterion=CriterionOptions(metrics=("output_kl",)), target=TargetOptions(remove=3),
              run=RunOptions(batch_size=8))
    full = prune(model, data, **kw)
    kw["criterion"] = CriterionOptions(metrics=("output_kl",), rescore_top=10)  # K >= candidates: the same
    assert prune(model, data, **kw).removed_ids == full.removed_ids
    kw["criterion"] = CriterionOptions(metrics=("output_kl",), rescore_top=2)
    top2 = prune(model, data, **kw)
    assert [len(r.blocks) for r in top2.rounds] == [6, 2, 2]
    assert top2.removed_ids[0] == full.removed_ids[0]
    assert top2.removed_ids[1] in full.rounds[0].order[:2]
    with pytest.raises(InputError):
        prune(model, data, criterion=CriterionOptions(rescore_top=0), target=TargetOptions(remove=1))


def test_cli_bad_weights_one_line(mlp, tmp_path):
    import subprocess
    import sys

    model, _, x = mlp
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", x)
    for extra in (["--weights", "cka"], ["--metrics", "cka", "--weights", "linear_1=2"], ["--metrics", "nope+paper"]):
        r = subprocess.run([sys.executable, "-m", "onnx_consensus.cli", str(tmp_path / "m.onnx"),
                            str(tmp_path / "o.onnx"),
                            "--calib", str(tmp_path / "x.npy"), "--remove", "1", "-q", *extra],
                           capture_output=True, text=True)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode != 0 and any(w in last for w in ("--weights", "nope")), (extra, r.stderr)


def test_softmax_output_is_compared_as_probabilities(tmp_path):
    """A model whose output is a Softmax (probabilities): output_kl is KL(p_original || p_without_block), the
    same value as for the logits model without the Softmax, not the KL of softmax(probabilities)."""
    from onnx import helper

    logits_model = residual_mlp(4)
    probs_model = onnx.ModelProto()
    probs_model.CopyFrom(logits_model)
    g = probs_model.graph
    g.node[-1].output[0] = "z"
    g.node.append(helper.make_node("Softmax", ["z"], ["probs"], axis=-1))
    g.output[0].name = "probs"
    x = np.random.default_rng(5).standard_normal((24, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    by_logits = score_blocks(logits_model, load_calibration(tmp_path, logits_model), metrics=["output_kl"])
    by_probs = score_blocks(probs_model, load_calibration(tmp_path, probs_model), metrics=["output_kl"])
    want = {b.id: b.scores["output_kl"] for b in by_logits.blocks}
    assert max(want.values()) > 1e-3
    for b in by_probs.blocks:
        assert b.scores["output_kl"] == pytest.approx(want[b.id], rel=1e-3, abs=1e-6)
