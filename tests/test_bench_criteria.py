"""tools/bench/criteria.py's table logic and task measures (closed forms, no model runs)."""
import numpy as np
import pytest

from tools.bench import criteria as bc
from tools.bench.criteria_tasks import task_measure


def test_ranks_ties_partial_rows_and_regret():
    cols = [("a", "1"), ("b", "1")]
    rows = {"oracle": {cols[0]: 90.0, cols[1]: 50.0},
            "x": {cols[0]: 80.0, cols[1]: 40.0},
            "y": {cols[0]: 80.0, cols[1]: 45.0},
            "z": {cols[0]: 85.0}}  # partial: ranked against the complete rows only
    t = bc.rank_table(rows, cols)
    assert t["x"]["ranks"] == {cols[0]: 1.5, cols[1]: 2.0}
    assert t["y"]["ranks"] == {cols[0]: 1.5, cols[1]: 1.0}
    assert t["z"]["ranks"] == {cols[0]: 1.0}
    assert t["x"]["regret"] == {cols[0]: 10.0, cols[1]: 10.0}
    assert "oracle" not in [c for c in t if t[c]["ranks"]]


def test_best_share_of_column_resamples():
    cols = [("a", "1"), ("b", "1")]
    # y beats x in every column: best in every resample; z partial: not a candidate
    dominated = {"x": {cols[0]: 1.0, cols[1]: 1.0}, "y": {cols[0]: 2.0, cols[1]: 2.0}, "z": {cols[0]: 9.0}}
    assert bc.best_share(dominated, cols, n=50) == {"x": 0.0, "y": 1.0}
    # each best in one column: a resample is AA (x), BB (y) or mixed (tie, split): 1/4 + 1/2 * 1/2 = 1/2 each
    split = {"x": {cols[0]: 2.0, cols[1]: 1.0}, "y": {cols[0]: 1.0, cols[1]: 2.0}}
    share = bc.best_share(split, cols, n=4000)
    assert abs(share["x"] - 0.5) < 0.03 and abs(share["x"] + share["y"] - 1.0) < 1e-9


def test_task_measures_closed_forms():
    z = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    acc, ll = task_measure("label_acc", [z], [{}], [np.array([0, 0, 0])])
    assert np.isclose(acc, 100 * 2 / 3)
    assert np.isclose(ll, np.mean([-np.log1p(np.exp(-2)), -1 - np.log1p(np.exp(-1)), -np.log1p(np.exp(-3))]))
    ids = np.array([[1, 2, 3]])
    logits = np.zeros((1, 3, 4))
    logits[0, 0, 2] = logits[0, 1, 0] = 5.0  # right at position 0, wrong at 1; position 2 predicts nothing
    acc, _ = task_measure("next_token", [logits], [{"input_ids": ids}], [None])
    assert acc == 50.0
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    cos, nn = task_measure("cosine", [ref * 3], [{}], [None], [ref])
    assert np.isclose(cos, 100.0) and nn == 1.0


def test_tables_read_the_cached_unit_rows(tmp_path, monkeypatch):
    """Units written through the harness come back in the tables: the no-fine-tune measure per (model, level)
    and the fine-tuned one through the unit's removal order."""
    import argparse

    from tools.bench import harness

    monkeypatch.setattr(harness, "ROOT", tmp_path)
    args = argparse.Namespace(max_samples=128)
    task = bc.TASKS["resnet56"]
    levels = [str(v) for v in task.levels]
    order = [f"b{i}" for i in range(max(task.levels) + 2)]
    cost = harness.Cost(1.0, 2.0, (0.1, 0.2))
    unit = bc.UnitRow("resnet56", "cka", ["cka"], {}, 0, order, {L: 70.0 + i for i, L in enumerate(levels)},
                      {L: -0.4 for L in levels}, 93.0, "accuracy", cost, cost, 128, 40)
    harness.write_json(bc.cache_file(args, "resnet56", "cka"), unit)
    rows, cols, originals = bc.collect(args, finetuned=False)
    assert rows == {"cka": {("resnet56", L): 70.0 + i for i, L in enumerate(levels)}}
    assert originals == {"resnet56": 93.0} and all(("resnet56", L) in cols for L in levels)
    jobs = bc.ft_jobs(argparse.Namespace(**vars(args), models="resnet56", criteria="cka", shard=None))
    assert jobs == [("resnet56", order[:int(L)]) for L in levels]
    ft = bc.FinetuneRow("resnet56", order[:int(levels[0])], 88.25, -0.2, 93.0, 256, cost, cost)
    harness.write_json(bc.ft_file(args, "resnet56", ft.removed), ft)
    assert bc.collect(args, finetuned=True)[0] == {"cka": {("resnet56", levels[0]): 88.25}}
