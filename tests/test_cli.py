"""onnx-cprune end to end: the shipped model, inspect, bad inputs (one line, exit code, nothing left behind)."""
import json
import os
import subprocess

import numpy as np
import onnx
import pytest

from onnx_consensus.cli import main
from onnx_consensus.data import load_calibration
from onnx_consensus.graph.blocks import find_blocks
from onnx_consensus.graph.ir import interface
from onnx_consensus.report import METADATA_KEY, sha256_file
from tests.helpers import (ROOT, env_with_root, installed_entry_point, resnet_onnx, run, temporaries,
                           tiny_residual_graph, zero_branch)

SHIPPED = os.path.join(ROOT, "models", "resnet56_fmnist.onnx")
CALIB = os.path.join(ROOT, "examples", "fmnist_calib")


@pytest.mark.parametrize("schedule", [pytest.param("one-shot", id="smoke"),
                                      pytest.param("iterative", id="full", marks=pytest.mark.slow)])
def test_shipped_model_end_to_end(tmp_path, schedule):
    """Two removals from the shipped ResNet-56. smoke (default run): one-shot, no latency (one scoring round,
    half the CPU); full (``-m slow``): the default iterative schedule (two rounds) and a latency measurement.
    The same assertions, but for the rounds' sizes."""
    out, rep = tmp_path / "pruned.onnx", tmp_path / "report.json"
    before = sha256_file(SHIPPED)
    timing = ["--latency-runs", "3"] if schedule == "iterative" else ["--no-latency"]
    code = main([SHIPPED, str(out), "--calib", CALIB, "--remove", "2", "--max-samples", "64", "--schedule", schedule,
                 "--report", str(rep), "-q", *timing])
    assert code == 0
    assert sha256_file(SHIPPED) == before
    pruned, original = onnx.load(out), onnx.load(SHIPPED)
    onnx.checker.check_model(pruned, full_check=True)
    assert interface(pruned) == interface(original)
    report = json.loads(rep.read_text())
    assert len(report["removed"]) == 2
    assert report["macs"]["before"] == 125_747_840
    assert report["macs"]["before"] - report["macs"]["after"] == 2 * 4_718_592
    assert report["input"]["sha256"] == before and report["version"] and report["seed"] == 0
    # hold-out fidelity against onnxruntime runs of both models on the hold-out fifth of the 64 samples
    hold = load_calibration(CALIB, original, max_samples=64).split(0.2, seed=0)[1]
    x = np.load(os.path.join(CALIB, "calib.npy"))[:64][hold]
    labels = np.load(os.path.join(CALIB, "labels.npy"))[:64][hold]
    p_pruned, p_original = run(pruned, {"input": x})[0].argmax(1), run(original, {"input": x})[0].argmax(1)
    fid = report["fidelity"]
    assert fid["n"] == len(hold) == report["samples"]["holdout"] == 13
    assert fid["agreement"] == pytest.approx(np.mean(p_pruned == p_original), abs=1e-6)
    assert fid["accuracy"] == pytest.approx(np.mean(p_pruned == labels), abs=1e-6)
    assert fid["reference_accuracy"] == pytest.approx(np.mean(p_original == labels), abs=1e-6)
    assert [len(r["blocks"]) for r in report["rounds"]] == ([25, 24] if schedule == "iterative" else [25])
    first = report["rounds"][0]["blocks"][0]
    # the default criterion without fine-tuning (--metrics output) on a classifier: output_kl
    assert set(first["scores"]) == set(first["ranks"]) == {"output_kl"}
    assert report["criterion"] == {"metrics": ["output"], "default": "without fine-tuning"}
    meta = {p.key: p.value for p in pruned.metadata_props}
    assert json.loads(meta[METADATA_KEY])["removed_ids"] == report["removed_ids"]
    x = np.load(os.path.join(CALIB, "calib.npy"))[:3]
    assert run(pruned, {"input": x})[0].shape == (3, 10)


def test_console_script_subprocess(tmp_path, r20):
    """The installed `onnx-cprune` entry point ([project.scripts]) runs a job, importing this checkout."""
    exe = installed_entry_point("onnx-cprune")
    if exe is None:
        pytest.skip("the onnx-cprune entry point is not installed (pip install -e .)")
    model, calib = r20
    out = tmp_path / "o.onnx"
    p = subprocess.run([exe, str(model), str(out), "--calib", str(calib), "--remove", "1", "--metrics", "cka",
                        "-q", "--no-latency"], capture_output=True, text=True, cwd=tmp_path, env=env_with_root())
    assert p.returncode == 0, p.stderr
    assert "Removed 1 of 7" in p.stdout and out.exists()
    assert "Ranked by --metrics cka\n" in p.stdout  # given, so no word about defaults
    onnx.checker.check_model(str(out), full_check=True)


def test_remove_one_picks_zeroed_block_exactly(tmp_path, r20):
    _, calib = r20
    model = resnet_onnx(20, "folded")
    target = find_blocks(model).blocks[3]
    zero_branch(model, target)
    src, out, rep = tmp_path / "z.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(model, src)
    assert main([str(src), str(out), "--calib", str(calib), "--remove", "1", "-q", "--no-latency",
                 "--report", str(rep)]) == 0
    assert json.loads(rep.read_text())["removed_ids"] == [target.id]
    x = np.load(calib / "x.npy")[:5]
    np.testing.assert_allclose(run(onnx.load(out), {"input": x})[0], run(model, {"input": x})[0], rtol=1e-5, atol=1e-5)


def test_inspect_json(capsys):
    assert main(["inspect", SHIPPED, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["blocks"]) == 25 and len(out["not_removable"]) == 2
    assert {"id", "entry", "exit", "nodes", "macs"} <= set(out["blocks"][0])
    assert all(b["macs"] == 4_718_592 for b in out["blocks"])
    assert all("projection" in n["reason"] for n in out["not_removable"])


def test_inspect_text_and_unknown_macs(tmp_path, capsys):
    """A dynamic sequence axis the batch size does not fix: MACs unknown, said so; --input-shape counts them."""
    p = tmp_path / "t.onnx"
    onnx.save(tiny_residual_graph(seq=True), p)  # x (N, S, 4)
    assert main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    assert "1 removable block(s); MACs unknown (use --input-shape)" in out
    row = [line.split() for line in out.splitlines() if line.strip().startswith("0 ")]
    assert len(row) == 1 and row[0][3:5] == ["unknown", "-"], out  # the block's MACs and share
    assert main(["inspect", str(p), "--input-shape", "x:2x5x4", "--json"]) == 0
    shaped = json.loads(capsys.readouterr().out)
    assert shaped["macs"] == 2 * 5 * (4 * 4 + 4 * 4 + 4 * 3)  # three MatMuls over N*S = 10 rows
    assert shaped["blocks"][0]["macs"] == 2 * 5 * 4 * 4
    assert shaped["blocks"][0]["macs_share"] == pytest.approx(160 / 440)


def test_target_cannot_be_met_exit_3(tmp_path, r20, capsys):
    model, calib = r20
    out = tmp_path / "o.onnx"
    assert main([str(model), str(out), "--calib", str(calib), "--remove", "6", "--metrics", "cka", "-q",
                 "--schedule", "one-shot"]) == 3
    assert not out.exists() and not temporaries(tmp_path)
    assert "cannot be met" in capsys.readouterr().err


def test_no_removable_block_exit_0_nothing_written(tmp_path, capsys):
    from onnx import helper, TensorProto
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    src = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), src)
    calib = tmp_path / "c"
    calib.mkdir()
    np.save(calib / "x.npy", np.ones((12, 4), np.float32))
    out = tmp_path / "o.onnx"
    assert main([str(src), str(out), "--calib", str(calib), "-q"]) == 0
    assert not out.exists()
    assert "nothing written" in capsys.readouterr().out


def _bad(tmp_path, r20, kind):
    model, calib = r20
    m, c = str(model), str(calib)
    if kind == "missing model":
        m = str(tmp_path / "nope.onnx")
    elif kind == "empty model":
        m = str(tmp_path / "empty.onnx")
        open(m, "wb").close()
    elif kind == "corrupt model":
        m = str(tmp_path / "corrupt.onnx")
        with open(model, "rb") as f:
            data = f.read()
        with open(m, "wb") as f:
            f.write(data[: len(data) // 3])
    elif kind == "not onnx":
        m = str(tmp_path / "text.onnx")
        with open(m, "w") as f:
            f.write("hello, I am not a model\n" * 10)
    elif kind == "calib missing":
        c = str(tmp_path / "nodata")
    elif kind == "calib empty":
        c = str(tmp_path / "emptydata")
        os.makedirs(c)
    elif kind == "wrong shape":
        c = str(tmp_path / "ws")
        os.makedirs(c)
        np.save(os.path.join(c, "x.npy"), np.zeros((4, 3, 28, 28), np.float32))
    elif kind == "wrong dtype":
        c = str(tmp_path / "wd")
        os.makedirs(c)
        np.save(os.path.join(c, "x.npy"), np.zeros((4, 3, 32, 32), np.int32))
    elif kind == "nan":
        c = str(tmp_path / "nan")
        os.makedirs(c)
        x = np.zeros((12, 3, 32, 32), np.float32)
        x[5, 0, 0, 0] = np.nan
        np.save(os.path.join(c, "x.npy"), x)
    return m, c


BAD = ["missing model", "empty model", "corrupt model", "not onnx", "calib missing", "calib empty",
       "wrong shape", "wrong dtype", "nan", "output dir missing"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_one_line_exit_2(tmp_path, r20, capsys, kind):
    m, c = _bad(tmp_path, r20, kind)
    out = tmp_path / ("missing-dir/o.onnx" if kind == "output dir missing" else "o.onnx")
    before = sha256_file(r20[0])
    code = main([m, str(out), "--calib", c, "--remove", "1", "--metrics", "cka", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("onnx-cprune: error:") and "\n" not in err and "Traceback" not in err
    assert not out.exists() and not temporaries(tmp_path)
    assert sha256_file(r20[0]) == before


def test_quantized_graph_pruned_but_not_finetuned(tmp_path, capsys):
    """A QDQ graph is pruned like a float one; fine-tuning it is refused in one line naming what to do instead."""
    from onnx import helper, numpy_helper
    m = tiny_residual_graph()
    g = m.graph
    g.initializer.extend([numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                          numpy_helper.from_array(np.array(0, np.uint8), "z")])
    for n in g.node:
        n.input[:] = ["xdq" if i == "x" else i for i in n.input]
    g.node.insert(0, helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xdq"]))
    g.node.insert(0, helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]))
    src, out = tmp_path / "q.onnx", tmp_path / "o.onnx"
    onnx.save(m, src)
    calib = tmp_path / "c"
    calib.mkdir()
    np.save(calib / "x.npy", np.random.default_rng(0).standard_normal((12, 4)).astype(np.float32))
    assert main([str(src), str(out), "--calib", str(calib), "-q", "--finetune-epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "quantized graph (DequantizeLinear, QuantizeLinear)" in err and "prune the float model" in err
    assert "\n" not in err.strip() and not out.exists()
    assert main([str(src), str(out), "--calib", str(calib), "-q", "--remove", "1", "--keep-per-stage", "0",
                 "--no-latency"]) == 0
    onnx.checker.check_model(onnx.load(str(out)))


def test_bench_json_with_eval(tmp_path, r20, capsys):
    from onnx_consensus.graph.surgery import remove_blocks
    model, calib = r20
    m = onnx.load(model)
    pruned = tmp_path / "p.onnx"
    onnx.save(remove_blocks(m, find_blocks(m).blocks[:2]), pruned)
    x = np.load(calib / "x.npy")
    ev = tmp_path / "ev"
    ev.mkdir()
    np.save(ev / "x.npy", x)
    np.save(ev / "labels.npy", run(m, {"input": x})[0].argmax(1))
    assert main(["bench", str(model), str(pruned), "--batch-sizes", "1,4", "--runs", "3", "--warmup", "1",
                 "--eval", str(ev), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["batch_size"]) for r in rows] == [(str(model), 1), (str(pruned), 1), (str(model), 4),
                                                            (str(pruned), 4)]
    assert rows[0]["ratio"] == 1.0 and rows[0]["accuracy"] == 1.0 and rows[0]["agreement"] == 1.0
    assert rows[1]["macs"] == rows[0]["macs"] - 2 * 4_718_592
    assert all(r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] for r in rows)


def test_alternated_latency_sessions_do_not_spin(r20):
    """Two sessions timed in alternation run with intra-op spinning off (a spinning idle pool steals the
    cores of the session being timed); one session alone keeps onnxruntime's default."""
    import onnx

    from onnx_consensus.bench import measure_latency, random_feed
    from onnx_consensus.runtime import make_session

    model = onnx.load(r20[0])
    feed = random_feed(model, 2)
    two = measure_latency([model, model], feed, runs=2, warmup=1, threads=2)
    one = measure_latency([model], feed, runs=2, warmup=1, threads=2)
    assert [t.spinning for t in two] == [False, False] and one[0].spinning is True
    opts = make_session(model, threads=2, spinning=False).get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_bench_spin_wait_flag(r20, capsys):
    """`bench` alternating two models turns spinning off unless --spin-wait keeps it; the JSON says which."""
    import json

    for extra, want in (([], False), (["--spin-wait"], True)):
        assert main(["bench", str(r20[0]), str(r20[0]), "--batch-sizes", "1", "--runs", "2", "--warmup", "1",
                     "--json", *extra]) == 0
        assert {r["spinning"] for r in json.loads(capsys.readouterr().out)} == {want}


# ---------------------------------------------------------------- issue 12: inspect and shapes (failures 4, 7, 8)


def test_inspect_writes_nothing_in_the_working_directory(tmp_path, monkeypatch, capsys):
    """Failure 8: symbolic shape inference that cannot complete left sym_shape_infer_temp.onnx in the cwd."""
    from tests import shape_graphs as sg

    model = tmp_path / "m.onnx"
    onnx.save(sg.custom_op_matmul(), model)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["inspect", str(model)]) == 0
    assert "MACs unknown" in capsys.readouterr().out
    assert os.listdir(cwd) == []


def test_inspect_input_shape_for_minus_one_dims(tmp_path, capsys):
    """Failure 4: --input-shape was refused for a dim written as -1 ("the model fixes it to -1")."""
    from tests import shape_graphs as sg

    model = tmp_path / "m.onnx"
    onnx.save(sg.conv_minus_one(hw=(-1, -1)), model)
    assert main(["inspect", str(model)]) == 0
    assert "MACs unknown" in capsys.readouterr().out
    assert main(["inspect", str(model), "--input-shape", "x:2x3x5x7"]) == 0
    assert f"MACs {2 * 4 * 5 * 7 * 3 * 9:,}" in capsys.readouterr().out


def test_inspect_macs_inside_if(tmp_path, capsys):
    """Failure 7: MACs inside If were reported as 0; now the costlier branch, and inspect says so."""
    from tests import shape_graphs as sg

    model = tmp_path / "m.onnx"
    onnx.save(sg.if_matmuls(), model)
    assert main(["inspect", str(model)]) == 0
    out = capsys.readouterr().out
    assert "MACs 256" in out and "costlier branch" in out
    assert main(["inspect", str(model), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["macs"] == 256 and any("If" in n for n in report["notes"])


@pytest.mark.real
def test_inspect_real_quantized_model_writes_nothing(tmp_path, monkeypatch, capsys):
    """Failure 8 as found: inspect on ddddocr's quantized OCR model left a 13.5 MB <uuid>.data and
    sym_shape_infer_temp.onnx in the working directory."""
    from tests import shape_graphs as sg

    path = sg.real_model("ddddocr_ocr_q")
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", path]) == 0
    assert os.listdir(tmp_path) == []


@pytest.mark.real
def test_inspect_real_silero_vad_macs_not_zero(capsys):
    from tests import shape_graphs as sg

    assert main(["inspect", sg.real_model("silero_vad")]) == 0
    out = capsys.readouterr().out
    assert "MACs 0" not in out and "MACs unknown" in out


@pytest.mark.real
def test_inspect_real_ppocr_cls_input_shape_with_minus_one_batch(capsys):
    from tests import shape_graphs as sg

    assert main(["inspect", sg.real_model("ppocr_cls"), "--input-shape", "x:1x3x48x192"]) == 0
    out = capsys.readouterr().out
    assert "MACs unknown" not in out and "MACs 0" not in out
