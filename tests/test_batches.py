"""data.batches.Batches: calibration arrays, the float32 cast for a bfloat16 model and decoder text implement one
protocol, and each answers it with its own data (compared with the arrays and windows themselves)."""
import ml_dtypes
import numpy as np
import pytest

from onnx_consensus.batching import counted_batches
from onnx_consensus.data import load_calibration
from onnx_consensus.data.batches import Batches
from onnx_consensus.data.for_model import Float32Batches, calibration_for
from onnx_consensus.errors import InputError
from onnx_consensus.llm.text import TextData
from onnx_consensus.options import DataOptions
from tests.helpers import residual_mlp


def _bf16_data(tmp_path, n=10, labels=True):
    x = np.random.default_rng(0).standard_normal((n, 16)).astype(ml_dtypes.bfloat16)
    np.save(tmp_path / "x.npy", x)
    if labels:
        np.save(tmp_path / "labels.npy", np.arange(n, dtype=np.int64) % 3)
    return x


def test_calibration_and_its_float32_cast_are_batches(tmp_path):
    """The cast is a class of its own (no attribute proxy): every protocol answer is the wrapped data's, and its
    batches are the wrapped batches in float32, value for value."""
    x = _bf16_data(tmp_path)
    model = residual_mlp(2, 16, dtype=ml_dtypes.bfloat16)
    data = calibration_for(str(tmp_path), model, DataOptions())
    assert isinstance(data, Float32Batches) and isinstance(data, Batches)
    raw = data.data
    assert isinstance(raw, Batches)
    assert (data.n_samples, data.source, data.fixed_batch, data.batch_axes) == \
        (10, raw.source, raw.fixed_batch, raw.batch_axes) == (10, raw.source, None, {"x": 0})
    np.testing.assert_array_equal(data.labels, np.arange(10) % 3)
    score, hold = data.split(0.3, seed=5)
    s2, h2 = raw.split(0.3, seed=5)
    np.testing.assert_array_equal(score, s2)
    np.testing.assert_array_equal(hold, h2)
    np.testing.assert_array_equal(data.labels_for(hold), hold % 3)
    got = list(data.counted_batches(4, hold))
    assert all(f["x"].dtype == np.float32 for f, _ in got) and sum(n for _, n in got) == len(hold)
    np.testing.assert_array_equal(np.concatenate([f["x"] for f, _ in got]), x[hold].astype(np.float32))
    assert [f["x"].shape for f in data.batches(4)] == [(4, 16), (4, 16), (2, 16)]
    assert not hasattr(Float32Batches, "__getattr__")
    with pytest.raises(AttributeError):
        data.no_such_attribute  # noqa: B018 - nothing is forwarded beyond the protocol


def test_text_windows_are_batches():
    """Text: windows fed as input_ids, no labels, no fixed batch; split gives indices (as calibration data)
    and split_windows the same windows."""
    windows = np.arange(7 * 4, dtype=np.int64).reshape(7, 4)
    text = TextData(windows, "/x/calib.txt", "/x/tokenizer.json", 29)
    assert isinstance(text, Batches)
    assert (text.n_samples, text.labels, text.fixed_batch, text.batch_axes) == (7, None, None, {"input_ids": 0})
    score, hold = text.split(0.3, seed=1)
    assert score.dtype == hold.dtype == np.int64 and len(hold) == 2
    assert sorted(score.tolist() + hold.tolist()) == list(range(7))
    sw, hw = text.split_windows(0.3, seed=1)
    np.testing.assert_array_equal(sw, windows[score])
    np.testing.assert_array_equal(hw, windows[hold])
    got = list(counted_batches(text, 3, score))
    assert [n for _, n in got] == [3, 2] and text.labels_for(score) is None
    np.testing.assert_array_equal(np.concatenate([f["input_ids"] for f, _ in got]), windows[score])
    assert len(text.split(0.5)[1]) == 4 and len(TextData(windows[:1], "", "", 4).split(0.5)[1]) == 0
    with pytest.raises(InputError, match="batch size"):
        next(text.batches(0))


def test_plain_calibration_is_batches(tmp_path):
    _bf16_data(tmp_path, labels=False)
    data = load_calibration(str(tmp_path), residual_mlp(2, 16, dtype=ml_dtypes.bfloat16))
    assert isinstance(data, Batches) and data.labels is None and data.labels_for([0, 1]) is None
