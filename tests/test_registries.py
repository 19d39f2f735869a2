"""Every extension point is a registry, and adding to it is a one-file change (docs/ARCHITECTURE.md): a test per
registry that registers a new entry the way a contributor would, from a module of its own, and checks that the
command line and the pipeline USE it. Each fails if the registry is bypassed (a hard-coded list of names, choices
frozen at import, a dispatch that does not consult the registry).

The post-merge block rules have theirs in tests/test_blocks.py (test_registered_post_merge_rule_is_used)."""
import argparse
import importlib
import json
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from onnx_consensus.cli import main
from tests.helpers import residual_mlp


def _plugin(tmp_path, monkeypatch, name: str, source: str):
    """Import ``source`` as a new top-level module ``name`` (a contributor's file outside the package)."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(name)


@pytest.fixture
def mlp(tmp_path):
    """(model path, calibration folder) of a 4-block residual MLP, 48 samples."""
    path = tmp_path / "mlp.onnx"
    onnx.save(residual_mlp(4, 16), path)
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "x.npy", np.random.default_rng(0).standard_normal((48, 16)).astype(np.float32))
    return str(path), str(calib)


def test_a_metric_registered_in_a_new_module_is_taken_by_metrics_and_scores_the_blocks(tmp_path, monkeypatch, mlp):
    from onnx_consensus.metrics import registry

    plugin = _plugin(tmp_path, monkeypatch, "plugin_metric_mad", """
        import numpy as np
        from onnx_consensus.metrics import register_metric

        CALLS = []

        @register_metric("test_plugin_mad")
        def mad(X, Y, labels=None, *, seed=0):
            '''Mean absolute difference of the features.'''
            value = float(np.abs(np.asarray(X, np.float64) - np.asarray(Y, np.float64)).mean())
            CALLS.append(value)
            return value
        """)
    model, calib = mlp
    report = tmp_path / "r.json"
    try:
        code = main([model, str(tmp_path / "o.onnx"), "--calib", calib, "--metrics", "test_plugin_mad",
                     "--remove", "1", "--schedule", "one-shot", "--keep-per-stage", "0", "--no-latency", "-q",
                     "--report", str(report)])
    finally:
        registry._REGISTRY.pop("test_plugin_mad", None)
        sys.modules.pop("plugin_metric_mad", None)
    assert code == 0
    rnd = json.loads(report.read_text())["rounds"][0]
    assert rnd["metrics"] == ["test_plugin_mad"]
    scores = {b["id"]: b["scores"]["test_plugin_mad"] for b in rnd["blocks"]}
    assert len(scores) == 4 and sorted(scores.values()) == pytest.approx(sorted(plugin.CALLS))  # its values
    assert rnd["order"][0] == min(scores, key=scores.get)  # and it decided the order


def test_a_bridge_op_registered_by_a_test_is_used_by_the_bridge(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from onnx_consensus.bridge import ops, to_torch
    from onnx_consensus.errors import UnsupportedOperatorError

    w = np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("TimesTwo", ["m"], ["t"], domain="test.registry"),
             helper.make_node("Add", ["x", "t"], ["y"])]
    g = helper.make_graph(nodes, "plugin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [nh.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("test.registry", 1)])
    with pytest.raises(UnsupportedOperatorError, match="TimesTwo"):
        to_torch(model)
    plugin = _plugin(tmp_path, monkeypatch, "plugin_op_times_two", """
        from onnx_consensus.bridge import register_op

        CALLS = []

        @register_op("TimesTwo", since=1, domain="test.registry")
        def times_two(ctx, a):
            CALLS.append(ctx.op_type)
            return a * 2
        """)
    try:
        module = to_torch(model).train()
        x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
        out = module(torch.from_numpy(x))
        np.testing.assert_allclose(out.detach().numpy(), x + 2 * (x @ w), rtol=1e-5, atol=1e-5)
        assert plugin.CALLS == ["TimesTwo"]
        out.sum().backward()  # trainable through the new op: the weight before it gets its gradient
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and float(sum(g.abs().sum() for g in grads)) > 0
    finally:
        ops._REGISTRY.pop(("test.registry", "TimesTwo"), None)
        sys.modules.pop("plugin_op_times_two", None)


def test_an_option_field_added_to_an_options_dataclass_appears_in_the_parser(monkeypatch):
    """The prune parser is generated from options.GROUPS: a field declared with ``option(...)`` on one of
    those dataclasses becomes a flag in its group, with its help and type, and comes back through from_args."""
    from onnx_consensus.cli import parser as cli_parser
    from onnx_consensus.options import GROUPS, OutputOptions, option

    @dataclass
    class WithExtra(OutputOptions):
        test_extra: int = option("--test-extra", "a new option added by a test", default=7, type=int)

    monkeypatch.setattr(cli_parser, "GROUPS", tuple(WithExtra if c is OutputOptions else c for c in GROUPS))
    p = cli_parser.build_parser()
    ns = p.parse_args(["prune", "in.onnx", "out.onnx", "--calib", "d", "--test-extra", "3"])
    assert WithExtra.from_args(ns).test_extra == 3 and WithExtra.from_args(ns).latency is True
    prune = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices["prune"]
    group = next(g for g in prune._action_groups if g.title == OutputOptions.GROUP)
    assert any("--test-extra" in a.option_strings and "a new option added by a test" in a.help
               for a in group._group_actions)
    assert WithExtra.from_args(p.parse_args(["prune", "a", "b", "--calib", "d"])).test_extra == 7


def test_a_quantize_format_registered_in_a_new_module_is_taken_by_quantize(tmp_path, monkeypatch, mlp):
    from onnx_consensus.quantize import FORMATS

    plugin = _plugin(tmp_path, monkeypatch, "plugin_quant_tag", """
        import onnx
        from onnx_consensus.quantize import register_format

        CALLS = []

        @register_format("test_tag")
        def tag(model, batches):
            CALLS.append(model.graph.name)
            out = onnx.ModelProto()
            out.CopyFrom(model)
            out.graph.doc_string = "quantized by a plugin"
            return out
        """)
    model, calib = mlp
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    try:
        code = main([model, str(out), "--calib", calib, "--remove", "1", "--metrics", "cka", "--quantize", "test_tag",
                     "--no-latency", "-q", "--report", str(report)])
    finally:
        FORMATS.pop("test_tag", None)
        sys.modules.pop("plugin_quant_tag", None)
    assert code == 0 and plugin.CALLS  # the format ran ...
    assert onnx.load(out).graph.doc_string == "quantized by a plugin"  # ... and its model was written
    q = json.loads(report.read_text())["quantize"]
    assert q["format"] == "test_tag" and [r["name"] for r in q["rows"]][-1] == "pruned + quantized"


def test_an_export_folder_format_registered_in_a_new_module_is_detected_rewritten_and_written(tmp_path, monkeypatch):
    from onnx_consensus.graph.decoder import PLAIN
    from onnx_consensus.llm.folder import FOLDER_FORMATS, decoder_filename, detect_formats
    from tests.test_decoder_llm import synthetic_decoder
    from tests.test_llm_prune import _text, _tokenizer

    plugin = _plugin(tmp_path, monkeypatch, "plugin_folder_cfg", """
        from onnx_consensus.llm.folder import FolderFormat, register_folder_format

        CALLS = []

        def fields(text):
            return dict(line.split(" = ") for line in text.splitlines())

        def rewrite(name, text, kept, n_layers):
            CALLS.append((name, list(kept), n_layers))
            f = fields(text)
            f.update(layers=str(len(kept)), kept=",".join(map(str, kept)))
            return "".join(f"{k} = {v}\\n" for k, v in f.items())

        def model_name(folder, read):
            return fields(read("plugin.cfg"))["model"]

        register_folder_format(FolderFormat("test_plugin_cfg", ("plugin.cfg",), rewrite, model_name=model_name))
        """)
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(synthetic_decoder(PLAIN), str(src / "dec.onnx"))  # named by plugin.cfg only
    _tokenizer(src / "tokenizer.json")
    (src / "plugin.cfg").write_text("model = dec.onnx\nlayers = 4\n")
    (tmp_path / "calib.txt").write_text(_text(400))
    out, report = tmp_path / "out", tmp_path / "r.json"
    try:
        assert [f.name for f in detect_formats(src)] == ["test_plugin_cfg"]  # detected ...
        assert detect_formats(tmp_path) == []  # ... only where its config is
        assert decoder_filename(src) == "dec.onnx"
        with pytest.raises(ValueError, match="registered twice"):
            plugin.register_folder_format(FOLDER_FORMATS["test_plugin_cfg"])
        code = main([str(src), str(out), "--calib", str(tmp_path / "calib.txt"), "--seq-len", "8", "--remove", "2",
                     "--metrics", "cosine", "-q", "--report", str(report), "--latency-runs", "2"])
    finally:
        FOLDER_FORMATS.pop("test_plugin_cfg", None)
        sys.modules.pop("plugin_folder_cfg", None)
    assert code == 0
    removed = sorted(x["index"] for x in json.loads(report.read_text())["removed"])
    kept = [i for i in range(4) if i not in removed]
    assert len(removed) == 2 and plugin.CALLS == [("plugin.cfg", kept, 4)]
    # the pruned folder: the model under the name the format gave, its config rewritten for the kept layers
    assert sorted(p.name for p in out.iterdir()) == ["dec.onnx", "plugin.cfg", "tokenizer.json"]
    assert (out / "plugin.cfg").read_text() == f"model = dec.onnx\nlayers = 2\nkept = {kept[0]},{kept[1]}\n"
    assert len(onnx.load(str(out / "dec.onnx")).graph.input) == len(onnx.load(str(src / "dec.onnx")).graph.input) - 4
