"""tools/bench/session_configs.py: config names parsed to session options, each config measured in its own child
process on random feeds of a model's declared inputs."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tools.bench.session_configs import main, parse_config


def test_configs_parse_to_arena_level_and_prepacking():
    assert parse_config("shared") == {"name": "shared", "arena": "shared", "level": None, "prepack": True}
    assert parse_config("off/basic/noprepack") == {"name": "off/basic/noprepack", "arena": "off", "level": "basic",
                                                   "prepack": False}
    with pytest.raises(ValueError, match="arena must be one of off, own, shared"):
        parse_config("none")
    with pytest.raises(ValueError, match="'fast' is neither a level"):
        parse_config("own/fast")


def test_each_config_is_measured_in_a_child_process(tmp_path, capsys):
    w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                          [onnx.numpy_helper.from_array(w, "w")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), path)
    out = tmp_path / "rows.json"
    assert main([str(path), "--configs", "off,shared/basic", "--batch", "4", "--batches", "2", "--runs", "2",
                 "--live", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["config"], r["arena"], r["level"]) for r in rows] == [("off", "off", "all"),
                                                                     ("shared/basic", "shared", "basic")]
    for r in rows:
        assert (r["live"], r["batches"], r["runs"]) == (2, 2, 2)
        assert r["peak_rss_mb"] >= r["rss_loaded_mb"] > 0 and r["run_cpu_s"] >= 0
    assert "| shared/basic | basic | yes | 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(path), "--configs", "own/fast"])
