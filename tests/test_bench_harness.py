"""tools/bench/harness.py: the config key, result cache, shards, locks and bench rows every resumable benchmark
uses (tools/bench/criteria.py, between.py, rescore.py, tools/paper/)."""
import dataclasses
import hashlib
import json
import os

import pytest

from tools.bench import harness


def test_config_key_is_the_sha1_prefix_of_the_sorted_json():
    cfg = {"b": [1, 2], "a": {"y": 1.5, "x": None}}
    ref = hashlib.sha1(b'{"a": {"x": null, "y": 1.5}, "b": [1, 2]}').hexdigest()
    assert harness.config_key(cfg) == ref[:10] and harness.config_key(cfg, 16) == ref[:16]
    assert harness.config_key({"a": {"x": None, "y": 1.5}, "b": [1, 2]}) == ref[:10]  # key order is irrelevant
    assert harness.config_key({**cfg, "b": [2, 1]}) != ref[:10]


def test_paper_config_key_is_unchanged_by_the_harness():
    """The paper's cache folders are named by this key: the harness must give the key the earlier code gave."""
    from tools.paper.common import CONFIG

    blob = json.dumps(dataclasses.asdict(CONFIG), sort_keys=True).encode()
    assert CONFIG.key() == hashlib.sha1(blob).hexdigest()[:10]


def test_shard_takes_every_nth_unit():
    units = list("abcdefg")
    assert harness.shard(units, None) == units and harness.shard(units, "") == units
    assert harness.shard(units, "0/2") == list("aceg") and harness.shard(units, "1/2") == list("bdf")
    parts = [harness.shard(units, f"{k}/3") for k in range(3)]
    assert sorted(sum(parts, [])) == units  # the shards cover the list once


@dataclasses.dataclass
class _Row(harness.BenchRow):
    name: str
    cost: harness.Cost
    order: list
    extra: int | None = None

    def __post_init__(self):
        self.cost = harness.Cost.of(self.cost)


def test_bench_rows_round_trip_through_the_cache(tmp_path):
    path = tmp_path / "sub" / "row.json"
    assert _Row.load(path) is None
    row = _Row("unit", harness.Cost(1.5, 2.0, (0.5, 1.0)), ["a", "b"])
    harness.write_json(path, row)
    data = json.loads(path.read_text())
    assert data["cost"] == {"cpu_seconds": 1.5, "wall_seconds": 2.0, "loadavg": [0.5, 1.0]}  # the JSON keys
    back = _Row.load(path)
    assert back.cost.cpu_seconds == 1.5 and back.order == ["a", "b"] and back.extra is None
    # a row cached by an older run, with a key that is no field any more and without the optional one
    path.write_text(json.dumps({"name": "old", "cost": data["cost"], "order": [], "gone": 1}))
    assert _Row.load(path) == _Row("old", harness.Cost(1.5, 2.0, [0.5, 1.0]), [])
    assert not list(path.parent.glob("*.tmp*"))  # the atomic write left no temporary


def test_criteria_unit_rows_read_the_cached_json_keys(tmp_path):
    from tools.bench.criteria import UnitRow

    cost = {"cpu_seconds": 3.0, "wall_seconds": 4.0, "loadavg": [1.0, 1.1]}
    cached = {"model": "resnet56", "criterion": "oracle", "metrics": [], "weights": {}, "seed": 0,
              "order": ["b1", "b2"], "measure": {"5": 90.0}, "tiebreak": {"5": -0.3}, "original": 93.0,
              "kind": "accuracy", "prune": cost, "eval": cost}  # an oracle unit: no score_samples
    (tmp_path / "u.json").write_text(json.dumps(cached))
    row = UnitRow.load(tmp_path / "u.json")
    assert row.order == ["b1", "b2"] and row.measure["5"] == 90.0 and row.prune.wall_seconds == 4.0
    assert row.candidates_scored is None


def test_claim_locks_a_unit_for_one_live_process(tmp_path):
    p = tmp_path / "u.json"
    assert harness.claim(p)
    assert (tmp_path / "u.lock").read_text() == str(os.getpid())
    assert not harness.claim(p)  # held by a live process (this one)
    (tmp_path / "u.lock").write_text("999999999")  # a dead pid: the stale lock is taken over
    assert harness.claim(p)
    harness.release(p)
    p.write_text("{}")
    assert not harness.claim(p)  # done units are never claimed


def test_run_claimed_skips_done_and_held_units_and_releases_on_failure(tmp_path):
    done, held, todo, bad = (tmp_path / f"{n}.json" for n in ("done", "held", "todo", "bad"))
    done.write_text("{}")
    held.with_suffix(".lock").write_text(str(os.getpid()))  # a live worker holds it

    def boom():
        raise RuntimeError("unit failed")
    jobs = iter([(done, lambda: {"x": 0}), (held, lambda: {"x": 1}), (todo, lambda: {"x": 2}), (bad, boom)])
    results = harness.run_claimed(jobs)
    assert next(results) == {"x": 2}
    assert todo.read_text().replace(" ", "").replace("\n", "") == '{"x":2}' and not todo.with_suffix(".lock").exists()
    with pytest.raises(RuntimeError, match="unit failed"):
        next(results)
    assert not bad.exists() and not bad.with_suffix(".lock").exists()  # released, nothing half-written
    assert done.read_text() == "{}" and held.with_suffix(".lock").exists()


def test_paper_results_come_back_as_rows(tmp_path, monkeypatch):
    """The reproduction's cached JSON (the keys its writers used before the rows) loads as rows, nested ones
    included; a row saved comes back equal."""
    from tools.paper import common
    from tools.paper.rows import AttackRow, LatencyEntry, OriginalRow, PruneRow

    monkeypatch.setattr(harness, "ROOT", tmp_path)
    folder = tmp_path / ".cache" / "paper" / common.CONFIG.key()
    (folder / "prune").mkdir(parents=True)
    (folder / "prune" / "original.json").write_text('{"accuracy": 0.93, "macs": 100, "params": 7}')
    (folder / "prune" / "cka.json").write_text(json.dumps(
        {"criterion": "cka", "order": ["b1", "b2"], "rounds": 2, "prune_seconds": 3.5, "threads": 1,
         "levels": [{"level": 1, "macs": 90, "params": 6, "macs_cut": 0.1, "accuracy": 0.8}]}))
    assert common.load_result("prune", "original") == OriginalRow(0.93, 100, 7)
    run = common.load_result("prune", "cka")
    assert isinstance(run, PruneRow) and run.level(1).accuracy == 0.8 and run.order == ["b1", "b2"]
    assert common.load_result("prune", "missing") is None
    common.save_result("prune", "copy", run)
    assert common.load_result("prune", "copy") == run
    (folder / "latency").mkdir()
    (folder / "latency" / "t1-b1-r30.json").write_text(json.dumps(
        {"threads": 1, "batch_size": 1, "runs": 30, "opt_level": "all", "rows": [
            {"model": "original", "macs": 100, "macs_cut": 0.0, "median_ms": 2.0, "p90_ms": 2.5, "latency_cut": 0.0},
            {"model": "cka-L1", "macs": 90, "macs_cut": 0.1, "median_ms": 1.8, "p90_ms": 2.0, "latency_cut": 0.1,
             "original_ms_in_pair": 2.0}]}))
    lat = common.load_result("latency", "t1-b1-r30")
    assert [type(r) for r in lat.rows] == [LatencyEntry, LatencyEntry] and lat.rows[1].original_ms_in_pair == 2.0
    (folder / "robustness").mkdir()
    (folder / "robustness" / "original.json").write_text(json.dumps(
        {"criterion": "original", "level": None, "mode": None, "images": 10, "clean": 0.9,
         "attacks": [{"attack": "fgsm", "eps": 0.01, "steps": 1, "accuracy": 0.5}]}))
    assert common.load_result("robustness", "original").attacks == [AttackRow("fgsm", 0.01, 1, 0.5)]
