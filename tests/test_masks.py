"""Token masks (graph/masks.py): the polarity read from how the graph uses a mask input, the name fall-back
(logged), the --token-mask override, and its effect on pooled features."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from onnx_consensus.errors import InputError
from onnx_consensus.graph.masks import parse_token_mask, token_masks
from tests.helpers import run

D = 4


def attention_model(style: str, mask_name: str = "m") -> onnx.ModelProto:
    """x (N,T,D), mask (N,T) -> softmax(x x^T + mask bias) x, the bias written in one exporter's style:
    "hf": int mask, (1 - mask) * -1e4 added (1 = keep); "hf_where": Where(mask == 0, -inf, scores) (1 = keep);
    "torch": bool mask, Where(mask, -inf, 0) added (True = pad); "pool": bool mask, tokens zeroed by
    Mul(x, Cast(Not(mask))) (True = pad); "lengths": the mask only counts tokens (ReduceSum): no verdict;
    "conflict": one additive use says keep, a zeroing Mul says pad."""
    bool_mask = style in ("torch", "pool", "conflict")
    inits = [nh.from_array(np.array([1], np.int64), "ax1"), nh.from_array(np.array(1.0, np.float32), "one"),
             nh.from_array(np.array(-1e4, np.float32), "neg"), nh.from_array(np.array(-np.inf, np.float32), "ninf"),
             nh.from_array(np.array(0, np.int64), "zero_i"), nh.from_array(np.array(0.0, np.float32), "zero_f")]
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]), helper.make_node("MatMul", ["x", "xt"], ["s"])]
    scores = "s"
    if style == "hf":
        nodes += [helper.make_node("Unsqueeze", [mask_name, "ax1"], ["mu"]),
                  helper.make_node("Cast", ["mu"], ["mf"], to=TensorProto.FLOAT),
                  helper.make_node("Sub", ["one", "mf"], ["inv"]), helper.make_node("Mul", ["inv", "neg"], ["bias"]),
                  helper.make_node("Add", ["s", "bias"], ["sb"])]
        scores = "sb"
    elif style == "hf_where":
        nodes += [helper.make_node("Equal", [mask_name, "zero_i"], ["eq"]),
                  helper.make_node("Unsqueeze", ["eq", "ax1"], ["equ"]),
                  helper.make_node("Where", ["equ", "ninf", "s"], ["sb"])]
        scores = "sb"
    elif style in ("torch", "conflict"):
        nodes += [helper.make_node("Unsqueeze", [mask_name, "ax1"], ["mu"]),
                  helper.make_node("Where", ["mu", "ninf", "zero_f"], ["bias"]),
                  helper.make_node("Add", ["s", "bias"], ["sb"])]
        scores = "sb"
    nodes += [helper.make_node("Softmax", [scores], ["p"], axis=-1), helper.make_node("MatMul", ["p", "x"], ["a"])]
    out = "a"
    if style in ("pool", "conflict"):
        ax2 = nh.from_array(np.array([2], np.int64), "ax2")
        inits.append(ax2)
        nodes += [helper.make_node("Not" if style == "pool" else "Identity", [mask_name], ["kept"]),
                  helper.make_node("Unsqueeze", ["kept", "ax2"], ["ku"]),
                  helper.make_node("Cast", ["ku"], ["kf"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["a", "kf"], ["az"])]
        out = "az"
    if style == "lengths":
        nodes += [helper.make_node("Cast", [mask_name], ["mf"], to=TensorProto.FLOAT),
                  helper.make_node("ReduceSum", ["mf", "ax1"], ["len"], keepdims=1),
                  helper.make_node("Unsqueeze", ["len", "ax1"], ["lu"]), helper.make_node("Div", ["a", "lu"], ["al"])]
        out = "al"
    elem = TensorProto.BOOL if bool_mask else TensorProto.INT64
    g = helper.make_graph(nodes, style, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", D]),
                                         helper.make_tensor_value_info(mask_name, elem, ["N", "T"])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", "T", D])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("style,polarity", [("hf", "keep"), ("hf_where", "keep"), ("torch", "pad"), ("pool", "pad")])
def test_polarity_read_from_the_graph(style, polarity, caplog):
    """The polarity comes from the graph, not the name: an input called "padding_mask" that the graph uses
    as 1 = keep is a keep mask. The model runs, and padded tokens get no attention when the verdict says so."""
    model = attention_model(style, mask_name="padding_mask")
    with caplog.at_level(logging.INFO, logger="onnx_consensus"):
        masks = token_masks(model)
    assert {k: (m.polarity, m.source) for k, m in masks.items()} == {"padding_mask": (polarity, "structure")}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("from the graph" in r.getMessage() for r in caplog.records)
    # the verdict agrees with what the model computes: under it, a padded token gets no attention (or is
    # zeroed, for the pooling-only mask)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, D)).astype(np.float32)
    keep = np.array([[True, True, True, False]])
    value = keep if polarity == "keep" else ~keep
    feed_mask = value if style in ("torch", "pool") else value.astype(np.int64)
    a = run(model, {"x": x, "padding_mask": feed_mask})[0]
    x2 = x.copy()
    x2[0, 3] = 5.0  # change the padded token only
    b = run(model, {"x": x2, "padding_mask": feed_mask})[0]
    if style == "pool":
        assert not a[0, 3].any() and a[0, :3].all()
    else:
        np.testing.assert_allclose(a[0, :3], b[0, :3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", ["lengths", "conflict"])
@pytest.mark.parametrize("name,polarity", [("src_key_padding_mask", "pad"), ("attention_mask", "keep"), ("m", None)])
def test_name_fallback_is_logged(style, name, polarity, caplog):
    """No structural verdict (the mask only counts tokens, or its uses disagree): a name with "mask" decides,
    with a warning that says so; any other name is not a mask."""
    with caplog.at_level(logging.INFO, logger="onnx_consensus"):
        masks = token_masks(attention_model(style, mask_name=name))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if polarity is None:
        assert masks == {} and not warnings
        return
    assert {k: (m.polarity, m.source) for k, m in masks.items()} == {name: (polarity, "name")}
    assert len(warnings) == 1 and "guessed from its name" in warnings[0] and "--token-mask" in warnings[0]


def test_override():
    model = attention_model("lengths", mask_name="m")
    masks = token_masks(model, ["m:pad"])
    assert {k: (m.polarity, m.source) for k, m in masks.items()} == {"m": ("pad", "override")}
    assert token_masks(attention_model("hf"), ["m:pad"])["m"].polarity == "pad"  # the override wins
    assert parse_token_mask(["a:b:keep", "c:pad"]) == {"a:b": "keep", "c": "pad"}
    for bad in (["m"], ["m:maybe"], [":keep"]):
        with pytest.raises(InputError, match="--token-mask"):
            token_masks(model, bad)
    with pytest.raises(InputError, match="not an input"):
        token_masks(model, ["nope:keep"])


def test_override_reaches_pooled_features(tmp_path):
    """collect_features pools token tensors over the kept tokens: the override flips which tokens those are."""
    from onnx_consensus.data import load_calibration
    from onnx_consensus.graph.blocks import find_blocks
    from onnx_consensus.metrics.features import pool_features
    from onnx_consensus.scoring import collect_features
    from tests.test_transformers import tx_onnx, write_token_calib

    model = tx_onnx("post", 2, "classic")
    data = load_calibration(write_token_calib(tmp_path / "c", "post", (12,), 12), model)
    blocks = find_blocks(model).blocks[:1]
    default = collect_features(model, data, blocks, scope="local", batch_size=12)
    as_pad = collect_features(model, data, blocks, scope="local", batch_size=12, token_mask=("padding_mask:pad",))
    flipped = collect_features(model, data, blocks, scope="local", batch_size=12, token_mask=("padding_mask:keep",))
    b = blocks[0].id
    np.testing.assert_array_equal(default.before[b], as_pad.before[b])
    assert not np.allclose(default.before[b], flipped.before[b])
    # the default pools exactly the non-padding tokens
    from onnx_consensus.graph.instrument import expose
    from onnx_consensus.runtime import make_session

    feed = next(iter(data.batches(12)))
    entry = make_session(expose(model, [blocks[0].entry]), level="basic").run(None, feed)[-1]
    np.testing.assert_allclose(default.before[b], pool_features(entry, ~feed["padding_mask"]), rtol=1e-5, atol=1e-6)


def test_cli_token_mask_flag(tmp_path, capsys):
    """--token-mask reaches the pruner: a name that is no input is a one-line usage error (exit 2)."""
    from onnx_consensus.cli import main
    from tests.test_transformers import tx_onnx, write_token_calib

    path = tmp_path / "m.onnx"
    onnx.save(tx_onnx("post", 2, "classic"), path)
    calib = write_token_calib(tmp_path / "c", "post", (12,), 12)
    code = main(["prune", str(path), str(tmp_path / "o.onnx"), "--calib", calib, "--remove", "1",
                 "--token-mask", "nope:keep", "--no-latency", "--quiet"])
    assert code == 2 and "--token-mask" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()
