"""Models saved with external data (.onnx + .data): pruned and written the same way, the output's weights in
``<output>.data`` beside it, the input's files untouched. The >2 GB case is a slow test (it builds a
2.2 GB model); tools/bench/large.py measures its peak memory."""
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnx_consensus.cli import main
from onnx_consensus.graph.ir import interface
from onnx_consensus.report import sha256_file
from tests.helpers import CLI, ROOT, residual_mlp, run, temporaries


def _external(model, path, location):
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)


def _calib(folder, width, n=40):
    folder.mkdir()
    x = np.random.default_rng(0).standard_normal((n, width)).astype(np.float32)
    np.save(folder / "x.npy", x)
    return x


def test_external_data_kept_external(tmp_path):
    model = residual_mlp(6, 64)
    src_dir, out_dir = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out_dir.mkdir()
    src = src_dir / "m.onnx"
    _external(model, src, "m.weights")
    x = _calib(tmp_path / "c", 64)
    hashes = {f: sha256_file(src_dir / f) for f in os.listdir(src_dir)}
    out = out_dir / "p.onnx"
    assert main([str(src), str(out), "--calib", str(tmp_path / "c"), "--remove", "2", "--metrics", "cka", "-q",
                 "--no-latency"]) == 0
    assert {f: sha256_file(src_dir / f) for f in os.listdir(src_dir)} == hashes  # input files untouched
    assert sorted(os.listdir(out_dir)) == ["p.onnx", "p.onnx.data"]
    proto = onnx.load(out, load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"p.onnx.data"}
    assert os.path.getsize(out) < 10_000  # the weights are not inline
    pruned = onnx.load(out)
    onnx.checker.check_model(str(out), full_check=True)
    assert interface(pruned) == interface(model)
    assert len(pruned.graph.node) == len(model.graph.node) - 6
    assert run(pruned, {"x": x[:4]})[0].shape == (4, 10)
    assert temporaries(out_dir) == []


def test_output_never_overwrites_input_weights(tmp_path):
    """An output whose data file name is the input's data file is refused before any work."""
    src = tmp_path / "m.onnx"
    _external(residual_mlp(4, 16), src, "o.onnx.data")
    _calib(tmp_path / "c", 16)
    before = sha256_file(tmp_path / "o.onnx.data")
    code = main([str(src), str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "c"), "--remove", "1", "-q",
                 "--no-latency"])
    assert code == 2
    assert sha256_file(tmp_path / "o.onnx.data") == before and not (tmp_path / "o.onnx").exists()


def test_missing_external_data_is_one_line_error(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    _external(residual_mlp(4, 16), src, "m.data")
    os.remove(tmp_path / "m.data")
    _calib(tmp_path / "c", 16)
    code = main([str(src), str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "c"), "--remove", "1", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot read" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_over_2gb_external_model(tmp_path):
    """A 2.2 GB model (34 blocks of 4096x4096 float32) with external data: pruned in a subprocess, the
    output written as .onnx + .data, valid and runnable, the input's files unchanged."""
    subprocess.run([sys.executable, "-m", "tools.bench.large", "--build", str(tmp_path)], check=True, cwd=ROOT)
    src = tmp_path / "big.onnx"
    data_size = os.path.getsize(tmp_path / "big.onnx.data")
    assert data_size > 2**31
    before = (os.path.getsize(src), os.path.getmtime(tmp_path / "big.onnx.data"))
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    p = subprocess.run([*CLI, str(src), str(out), "--calib",
                        str(tmp_path / "calib"), "--remove", "2", "--metrics", "cka", "--schedule", "one-shot",
                        "-q", "--no-latency"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (os.path.getsize(src), os.path.getmtime(tmp_path / "big.onnx.data")) == before
    assert sorted(os.listdir(out.parent)) == ["pruned.onnx", "pruned.onnx.data"]
    assert os.path.getsize(out.parent / "pruned.onnx.data") < data_size
    onnx.checker.check_model(str(out), full_check=True)
    from onnx_consensus.runtime import make_session

    x = np.load(tmp_path / "calib" / "x.npy")[:2]
    assert make_session(str(out), threads=2).run(None, {"x": x})[0].shape == (2, 10)
