"""Issue 22, item 3: resource limits on hostile graphs and data files. Each case (tests/hostile.py) is refused in
one line with exit 2, quickly, before anything runs, with nothing written."""
import os
import time

import numpy as np
import onnx
import pytest

from onnx_consensus.cli import main
from onnx_consensus.data import formats
from onnx_consensus.errors import ResourceLimitError
from onnx_consensus.graph.sanity import check_model
from tests import hostile


def _refused(tmp_path, capsys, model_path, calib, *needles):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    runs = [[str(model_path), str(out / "p.onnx"), "--calib", str(calib), "--remove", "1", "-q", "--no-latency",
             "--report", str(out / "r.json")]]
    if calib == tmp_path / "calib.npy":
        runs.append(["inspect", str(model_path)])
    for argv in runs:
        t0 = time.perf_counter()
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert time.perf_counter() - t0 < 20, "refused, but not before running"
        assert len(err.splitlines()) == 1 and err.startswith("onnx-cprune: error:"), err
        for needle in needles:
            assert needle in err, err
    assert os.listdir(out) == []


def _calib(tmp_path):
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((24, hostile.WIDTH)).astype(np.float32))
    return tmp_path / "calib.npy"


NEEDLES = {"cycle": "cycle", "duplicate_output": "produced twice", "duplicate_graph_output": "listed twice",
           "deep_nesting": "nest deeper", "huge_declared_input": "memory budget", "constant_of_shape": "ConstantOfShape",
           "expand": "Expand", "tile": "Tile", "huge_attribute_tensor": "memory budget", "short_tensor": "holds",
           "huge_sparse": "sparse"}


@pytest.mark.parametrize("case", sorted(hostile.GRAPH_CASES))
def test_hostile_graph_refused(tmp_path, capsys, case):
    model = hostile.GRAPH_CASES[case](hostile.base_model(), 1)
    onnx.save(model, tmp_path / "m.onnx")
    _refused(tmp_path, capsys, tmp_path / "m.onnx", _calib(tmp_path), NEEDLES[case])


def test_valid_models_pass_the_checks():
    check_model(hostile.base_model())
    with pytest.raises(ResourceLimitError, match="memory budget"):  # the budget is the limit, not a constant
        check_model(hostile.base_model(), budget=100)


def test_pickled_npz_refused_even_when_not_strict(tmp_path, capsys):
    onnx.save(hostile.base_model(), tmp_path / "m.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "a.npy", np.zeros((8, hostile.WIDTH), np.float32))
    hostile.pickled_npz(calib / "b.npz", 3)
    _refused(tmp_path, capsys, tmp_path / "m.onnx", calib, "Python objects", "b.npz")


def test_compression_bomb_refused_before_inflating(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(formats, "memory_budget", lambda: 2**20)  # 1 MB, so the bomb can be small here
    onnx.save(hostile.base_model(), tmp_path / "m.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    hostile.compressed_bomb(calib / "a.npz", 8 * 2**20)
    assert os.path.getsize(calib / "a.npz") < 100_000
    _refused(tmp_path, capsys, tmp_path / "m.onnx", calib, "inflate", "memory budget")


@pytest.mark.parametrize("side", [10_000, 20_000])  # Pillow warns over 89.5 M pixels and refuses over twice that
def test_images_beyond_the_pixel_limit_refused(tmp_path, capsys, side):
    from tests.helpers import resnet_onnx_path

    calib = tmp_path / "calib"
    calib.mkdir()
    hostile.png_header(calib / "a.png", side, side)
    _refused(tmp_path, capsys, resnet_onnx_path(), calib, "pixels")
