"""The latency model (per-block savings, measured), the damage/time trade, and --target-latency.

No assertion on how fast anything is (figures come from tools/bench/latency_model.py); the tests check the
arithmetic, the cache, the trade rule on closed-form cases, and that a latency-target run writes a model whose
own measurement (reported) meets the goal it reports."""
import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnx_consensus.cli import main
from onnx_consensus.errors import InputError
from onnx_consensus.graph.blocks import find_blocks
from onnx_consensus.graph.ir import interface
from onnx_consensus.latency_model import LatencyModel, measure_block_latency, model_latency
from onnx_consensus.latency_target import Budget, budget_for, wanted_ms

WIDTHS = (16, 512, 16, 256)


def mixed_mlp(widths=WIDTHS, dim: int = 128, seed: int = 0) -> onnx.ModelProto:
    """x(N,dim) -> blocks h + Relu(h @ A_k) @ B_k with inner width widths[k] (cheap and costly blocks) ->
    logits(N,10). Block k's exit is 'h{k}'."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for k, w in enumerate(widths):
        inits += [numpy_helper.from_array((rng.standard_normal((dim, w)) / np.sqrt(dim)).astype(np.float32), f"a{k}"),
                  numpy_helper.from_array((rng.standard_normal((w, dim)) * 0.1 / np.sqrt(w)).astype(np.float32),
                                          f"b{k}")]
        nodes += [helper.make_node("MatMul", [x, f"a{k}"], [f"m{k}"]), helper.make_node("Relu", [f"m{k}"], [f"r{k}"]),
                  helper.make_node("MatMul", [f"r{k}", f"b{k}"], [f"n{k}"]),
                  helper.make_node("Add", [x, f"n{k}"], [f"h{k}"])]
        x = f"h{k}"
    inits.append(numpy_helper.from_array((rng.standard_normal((dim, 10)) * 0.3).astype(np.float32), "head"))
    nodes.append(helper.make_node("MatMul", [x, "head"], ["logits"]))
    g = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", dim])],
                          [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    onnx.save(mixed_mlp(), d / "m.onnx")
    (d / "calib").mkdir()
    np.save(d / "calib" / "x.npy", np.random.default_rng(1).standard_normal((40, 128)).astype(np.float32))
    return d


def test_predict_is_base_minus_savings():
    lm = LatencyModel(10.0, {"a": 1.5, "b": 2.0, "c": 0.25})
    assert lm.predict([]) == 10.0
    assert lm.predict(["a", "c"]) == pytest.approx(8.25)


def test_block_savings_add_up_to_the_measured_ends_and_are_cached():
    model = mixed_mlp()
    blocks = find_blocks(model, macs_per_node={}).blocks
    assert [b.id for b in blocks] == ["h0", "h1", "h2", "h3"]
    feed = {"x": np.ones((1, 128), np.float32)}
    lm = measure_block_latency(model, blocks, feed, threads=1, runs=8)
    assert set(lm.block_ms) == set(lm.marginal_ms) == {"h0", "h1", "h2", "h3"}
    assert all(v >= 0 for v in lm.block_ms.values())
    assert lm.base_ms > 0 and lm.floor_ms > 0
    if any(v > 0 for v in lm.marginal_ms.values()):  # the shares are scaled onto the measured ends
        assert sum(lm.block_ms.values()) == pytest.approx(lm.base_ms - lm.floor_ms)
        assert lm.predict(lm.block_ms) == pytest.approx(lm.floor_ms)
    assert measure_block_latency(model, blocks, feed, threads=1, runs=8) is lm  # same graph and settings
    assert measure_block_latency(model, blocks, {"x": np.ones((2, 128), np.float32)}, threads=1, runs=8) is not lm
    js = lm.to_json()
    assert js["batch_size"] == 1 and js["threads"] == 1 and js["providers"] == ["cpu"]


def test_budget_trade_rule():
    order = ["a", "b", "c"]  # least damage first
    same = Budget(1.0, {"a": 1, "b": 1, "c": 1}, {"a": 1, "b": 1, "c": 1})
    assert same.pick(order, {"a", "b", "c"}) == "a"  # equal costs: the damage order
    costly = Budget(1.5, {"a": 1, "b": 3, "c": 1}, {"a": 1, "b": 3, "c": 1})
    # mean cost 5/3: a -> 1 / 0.6 = 1.67, b -> 2 / 1.8 = 1.11, c -> 3 / 0.6 = 5: b saves enough to go first
    assert costly.pick(order, {"a", "b", "c"}) == "b"
    assert costly.pick(order, {"a", "c"}) == "a"
    assert Budget(1.0, {"a": 1}, {}).pick(order, {"b", "c"}) == "b"  # no costs: damage order alone
    assert costly.met(["b"]) and not costly.met(["a"]) and costly.met(["a", "c"])


def test_budget_for_choices():
    lm = LatencyModel(4.0, {"a": 1.0, "b": 0.5})

    class B:
        def __init__(self, i, macs):
            self.id, self.macs = i, macs
    blocks = [B("a", 10), B("b", 30)]
    assert budget_for(lm, 3.0, "damage", blocks).cost == {}
    assert budget_for(lm, 3.0, "latency", blocks).cost == {"a": 1.0, "b": 0.5}
    assert budget_for(lm, 3.0, "macs", blocks).cost == {"a": 10.0, "b": 30.0}
    assert budget_for(lm, 3.0, "damage", blocks, extra_ms=0.25).need_ms == pytest.approx(1.25)
    with pytest.raises(InputError, match="--latency-choice"):
        budget_for(lm, 3.0, "speed", blocks)


def test_wanted_ms_and_bad_targets():
    assert wanted_ms(10.0, 0.6, None) == pytest.approx(6.0)
    assert wanted_ms(10.0, None, 4.0) == 4.0
    for f, ms, msg in ((1.5, None, "between 0 and 1"), (0.5, 3.0, "not both"), (None, -1.0, "must be > 0")):
        with pytest.raises(InputError, match=msg):
            wanted_ms(10.0, f, ms)


def test_model_latency_on_a_file_model():
    lm = model_latency(mixed_mlp(), input_shapes={"x": (1, 128)}, threads=1, runs=5)
    assert set(lm.block_ms) == {"h0", "h1", "h2", "h3"}


def test_target_latency_run_meets_its_own_measurement(mixed, capsys):
    out, rep = mixed / "out.onnx", mixed / "r.json"
    code = main([str(mixed / "m.onnx"), str(out), "--calib", str(mixed / "calib"), "--target-latency", "0.9",
                 "--threads", "1", "--report", str(rep), "-q", "--no-latency", "--latency-choice", "latency"])
    assert code == 0
    lt = json.load(open(rep))["latency_target"]
    assert lt["met"] and lt["measured_ms"] <= lt["goal_ms"]
    assert lt["goal_ms"] == pytest.approx(min(0.9 * lt["original_ms"], lt["target_ms"]))
    assert lt["target_ms"] == pytest.approx(0.9 * lt["model"]["base_ms"], abs=1e-4)  # base_ms rounded to 4 places
    assert lt["choice"] == "latency" and lt["batch_size"] == 1 and len(lt["attempts"]) >= 1
    assert json.load(open(rep))["removed_ids"]  # something had to go
    assert interface(onnx.load(out)) == interface(mixed_mlp())
    assert "against the target" in capsys.readouterr().out


def test_target_latency_refuses_other_targets(mixed, capsys):
    code = main([str(mixed / "m.onnx"), str(mixed / "o2.onnx"), "--calib", str(mixed / "calib"),
                 "--target-latency", "0.5", "--remove", "1", "-q"])
    assert code == 2
    assert "cannot be combined with --remove" in capsys.readouterr().err
    assert not (mixed / "o2.onnx").exists()


def test_inspect_latency_cli(mixed, capsys):
    assert main(["inspect", str(mixed / "m.onnx"), "--latency", "--threads", "1", "--input-shape", "x:1x128",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["latency"]["block_ms"]) == {"h0", "h1", "h2", "h3"}
    assert [b["latency_ms"] for b in out["blocks"]] == [out["latency"]["block_ms"][b["id"]] for b in out["blocks"]]
    assert main(["inspect", str(mixed / "m.onnx"), "--latency", "--threads", "1", "--input-shape", "x:1x128"]) == 0
    text = capsys.readouterr().out
    assert "lower quartile" in text and "      ms" in text


def test_a_retry_removes_at_least_one_block_more(mixed, monkeypatch):
    """The written model misses the target by a hair on the first attempt (measurement replaced): the second
    attempt removes more blocks than the first instead of repeating it."""
    import onnx_consensus.latency_target as lt_mod
    from onnx_consensus.options import Options, RunOptions, TargetOptions
    from onnx_consensus.pipeline import run

    calls = []

    def fake(model, pruned, feed, threads, runs):
        calls.append(len(pruned.graph.node))
        return 1.0, (0.9 + 1e-6 if len(calls) == 1 else 0.1)  # 1st: just over 0.9 x 1.0; then well under
    monkeypatch.setattr(lt_mod, "measure_pruned", fake)
    monkeypatch.setattr(lt_mod, "measure_block_latency", lambda m, blocks, feed, threads=None, runs=None:
                        LatencyModel(1.0, {b.id: 0.05 for b in blocks}, floor_ms=0.8))
    out = run(str(mixed / "m.onnx"), str(mixed / "calib"),
              Options(run=RunOptions(progress=False, threads=1), target=TargetOptions(target_latency=0.9)))
    attempts = out.report["latency_target"]["attempts"]
    assert len(attempts) == 2 and attempts[1]["removed"] > attempts[0]["removed"] >= 2
    assert out.report["latency_target"]["met"] and calls[1] < calls[0]


def test_latency_rows_give_the_report_keys():
    """Latency rows are dataclasses; their JSON keeps the report's keys and values (the report's
    ``latency[batch]``, a `bench --json` row, a ``quantize`` row)."""
    from onnx_consensus.bench import BenchRow, Latency, LatencyChange
    from onnx_consensus.evaluate import compare
    from onnx_consensus.variants import VariantRow

    before, after = Latency(4, 2.0, 2.5, 30, 2, spinning=False), Latency(4, 1.5, 1.75, 30, 2, spinning=False)
    assert LatencyChange(before, after).to_json() == {
        "before_ms": 2.0, "after_ms": 1.5, "before_p90_ms": 2.5, "after_p90_ms": 1.75, "threads": 2,
        "opt_level": "all", "runs": 30, "spinning": False}
    row = BenchRow("p.onnx", after, 0.75, 1000, 10)
    assert row.to_json() == {"model": "p.onnx", "batch_size": 4, "median_ms": 1.5, "p90_ms": 1.75, "ratio": 0.75,
                             "macs": 1000, "params": 10, "threads": 2, "runs": 30, "opt_level": "all",
                             "spinning": False}
    row.accuracy, row.agreement, row.rel_error, row.eval_samples = 0.5, 1.0, 0.0, 8
    assert list(row.to_json())[-4:] == ["accuracy", "agreement", "rel_error", "eval_samples"]
    x = np.eye(4, 3, dtype=np.float32)
    fid = compare(x, x, np.array([0, 1, 2, 1]))  # the last row argmaxes to 0
    v = VariantRow("pruned", fid, None, 123, {"1": 0.5}).to_json()
    assert v == {"name": "pruned", "fidelity": fid.to_json(), "accuracy": fid.accuracy, "macs": None, "bytes": 123,
                 "latency_ms": {"1": 0.5}}
    assert fid.accuracy == 0.75
