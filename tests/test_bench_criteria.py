"""tools/bench/criteria.py's table logic and task measures (closed forms, no model runs)."""
import os

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


def test_claim_locks_a_unit_for_one_live_process(tmp_path):
    p = tmp_path / "u.json"
    assert bc.claim(p)
    assert (tmp_path / "u.lock").read_text() == str(os.getpid())
    assert not bc.claim(p)  # held by a live process (this one)
    (tmp_path / "u.lock").write_text("999999999")  # a dead pid: the stale lock is taken over
    assert bc.claim(p)
    bc.release(p)
    p.write_text("{}")
    assert not bc.claim(p)  # done units are never claimed


def test_run_claimed_skips_done_and_held_units_and_releases_on_failure(tmp_path):
    done, held, todo, bad = (tmp_path / f"{n}.json" for n in ("done", "held", "todo", "bad"))
    done.write_text("{}")
    held.with_suffix(".lock").write_text(str(os.getpid()))  # a live worker holds it

    def boom():
        raise RuntimeError("unit failed")
    jobs = iter([(done, lambda: {"x": 0}), (held, lambda: {"x": 1}), (todo, lambda: {"x": 2}), (bad, boom)])
    results = bc.run_claimed(jobs)
    assert next(results) == {"x": 2}
    assert todo.read_text().replace(" ", "").replace("\n", "") == '{"x":2}' and not todo.with_suffix(".lock").exists()
    with pytest.raises(RuntimeError, match="unit failed"):
        next(results)
    assert not bad.exists() and not bad.with_suffix(".lock").exists()  # released, nothing half-written
    assert done.read_text() == "{}" and held.with_suffix(".lock").exists()
