"""Calibration data: formats, validation messages, streaming, labels, split."""
from __future__ import annotations

import logging
import os
import tracemalloc
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_consensus.data import (
    CalibrationData,
    ImageOptions,
    InputSpec,
    load_calibration,
    model_input_specs,
)
from onnx_consensus.errors import InputError


def make_model(inputs: list[tuple[str, int, list]], initializer_input: bool = False) -> onnx.ModelProto:
    """A model whose graph inputs are ``inputs`` [(name, elem type, shape)]; each feeds an Identity."""
    vis = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    nodes = [helper.make_node("Identity", [n], [n + "_out"]) for n, _, _ in inputs]
    outs = [helper.make_tensor_value_info(n + "_out", t, s) for n, t, s in inputs]
    inits = []
    if initializer_input:
        w = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
        inits.append(w)
        vis.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]))
        nodes.append(helper.make_node("Identity", ["w"], ["w_out"]))
        outs.append(helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [2]))
    g = helper.make_graph(nodes, "g", vis, outs, initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


IMG = make_model([("x", TensorProto.FLOAT, ["N", 3, 8, 8])])
TOK = make_model([("ids", TensorProto.INT64, ["B", "S"]), ("mask", TensorProto.INT64, ["B", "S"])])


def rnd(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def collect(data: CalibrationData, bs: int, indices=None):
    return list(data.batches(bs, indices))


# ---------------------------------------------------------------- specs


def test_model_input_specs_excludes_initializers_and_keeps_dynamic_dims():
    m = make_model([("x", TensorProto.FLOAT, ["N", 3, None, 8])], initializer_input=True)
    specs = model_input_specs(m)
    assert specs == [InputSpec("x", np.dtype(np.float32), ("N", 3, None, 8))]


# ---------------------------------------------------------------- formats


def test_npy_batched_and_unbatched_in_sorted_order(tmp_path):
    a, b, c = rnd(5, 3, 8, 8, seed=1), rnd(3, 8, 8, seed=2), rnd(2, 3, 8, 8, seed=3)
    np.save(tmp_path / "b.npy", b)  # one sample, rank 3
    np.save(tmp_path / "a.npy", a)  # batch of 5
    np.save(tmp_path / "c.npy", c.astype(np.float64))  # float64 accepted, cast to float32
    (tmp_path / "notes.txt").write_text("ignored")
    data = load_calibration(tmp_path, IMG)
    assert data.n_samples == 8 and data.labels is None and data.skipped == []
    batches = collect(data, 3)
    assert [x["x"].shape[0] for x in batches] == [3, 3, 2]
    assert all(x["x"].dtype == np.float32 for x in batches)
    got = np.concatenate([x["x"] for x in batches])
    np.testing.assert_array_equal(got, np.concatenate([a, b[None], c]))


def test_single_file_path_and_indices_order(tmp_path):
    a = rnd(6, 3, 8, 8)
    np.save(tmp_path / "a.npy", a)
    data = load_calibration(tmp_path / "a.npy", str_model(tmp_path, IMG))
    got = np.concatenate([x["x"] for x in data.batches(4, [5, 0, 3, 3])])
    np.testing.assert_array_equal(got, a[[5, 0, 3, 3]])


def str_model(tmp_path, model) -> str:
    p = str(tmp_path / "model.onnx")
    onnx.save(model, p)
    return p


def test_npz_multi_input_batched_and_single_samples(tmp_path):
    ids = np.arange(12, dtype=np.int32).reshape(3, 4)  # int32 accepted for an int64 input
    np.savez(tmp_path / "a.npz", ids=ids, mask=np.ones((3, 4), np.int64), extra=np.zeros(2))
    np.savez_compressed(tmp_path / "b.npz", ids=np.full(4, 7, np.int64), mask=np.zeros(4, np.uint8))
    data = load_calibration(tmp_path, TOK)
    assert data.n_samples == 4
    (batch,) = collect(data, 10)
    assert set(batch) == {"ids", "mask"} and batch["ids"].dtype == np.int64
    np.testing.assert_array_equal(batch["ids"], np.concatenate([ids, np.full((1, 4), 7)]))
    np.testing.assert_array_equal(batch["mask"][:, 0], [1, 1, 1, 0])


def test_npz_single_input_any_key(tmp_path):
    a = rnd(2, 3, 8, 8)
    np.savez(tmp_path / "a.npz", a)  # key arr_0
    data = load_calibration(tmp_path, IMG)
    np.testing.assert_array_equal(next(data.batches(8))["x"], a)


def test_variable_sequence_lengths_never_mixed_in_a_batch(tmp_path):
    for i, (n, s) in enumerate([(3, 5), (2, 5), (4, 9), (1, 5)]):
        ids = np.full((n, s), i, np.int64)
        np.savez(tmp_path / f"{i}.npz", ids=ids, mask=np.ones_like(ids))
    data = load_calibration(tmp_path, TOK)
    batches = collect(data, 4)
    shapes = [b["ids"].shape for b in batches]
    # files 0 and 1 share length 5 and may be batched together; file 2 (length 9) breaks the batch
    assert shapes == [(4, 5), (1, 5), (4, 9), (1, 5)]
    np.testing.assert_array_equal(batches[0]["ids"][:, 0], [0, 0, 0, 1])
    # arbitrary order: the batch breaks at each change of shape
    shapes = [b["ids"].shape for b in data.batches(8, [0, 6, 3, 9])]
    assert shapes == [(1, 5), (1, 9), (2, 5)]


def test_labels_in_directory_and_explicit(tmp_path):
    np.save(tmp_path / "a.npy", rnd(3, 3, 8, 8))
    np.save(tmp_path / "b.npy", rnd(2, 3, 8, 8))
    np.save(tmp_path / "labels.npy", np.array([4, 3, 2, 1, 0], np.int32))
    data = load_calibration(tmp_path, IMG)
    assert data.n_samples == 5  # labels.npy is not a data file
    assert data.labels.dtype == np.int64 and data.labels.tolist() == [4, 3, 2, 1, 0]
    assert data.labels_for([1, 4]).tolist() == [3, 0]
    other = tmp_path.parent / (tmp_path.name + "_lab.npy")
    np.save(other, np.arange(5))
    assert load_calibration(tmp_path, IMG, labels=str(other)).labels.tolist() == [0, 1, 2, 3, 4]
    assert load_calibration(tmp_path, IMG, max_samples=4).labels.tolist() == [4, 3, 2, 1]


def test_max_samples(tmp_path):
    np.save(tmp_path / "a.npy", rnd(3, 3, 8, 8))
    np.save(tmp_path / "b.npy", rnd(3, 3, 8, 8))
    data = load_calibration(tmp_path, IMG, max_samples=4)
    assert data.n_samples == 4 and sum(b["x"].shape[0] for b in data.batches(3)) == 4


def test_split_disjoint_seeded_and_nonempty(tmp_path):
    np.save(tmp_path / "a.npy", rnd(50, 3, 8, 8))
    data = load_calibration(tmp_path, IMG)
    score, hold = data.split(0.2, seed=3)
    assert len(hold) == 10 and len(score) == 40
    assert set(score).isdisjoint(hold) and set(score) | set(hold) == set(range(50))
    s2, h2 = data.split(0.2, seed=3)
    assert np.array_equal(s2, score) and np.array_equal(h2, hold)
    assert not np.array_equal(data.split(0.2, seed=4)[1], hold)
    assert hold.tolist() != list(range(40, 50))  # shuffled, not a tail
    np.save(tmp_path / "a.npy", rnd(2, 3, 8, 8))
    s, h = load_calibration(tmp_path, IMG).split(0.01)
    assert len(h) == 1 and len(s) == 1
    with pytest.raises(InputError):
        data.split(1.0)


# ---------------------------------------------------------------- streaming


def test_streaming_does_not_load_whole_file(tmp_path):
    big = np.random.default_rng(0).standard_normal((850, 3, 32, 32)).astype(np.float32)  # 10.4 MB
    np.save(tmp_path / "big.npy", big)
    del big
    model = make_model([("x", TensorProto.FLOAT, ["N", 3, 32, 32])])
    data = load_calibration(tmp_path, model)
    # the index holds no array data
    arrays = [v for v in vars(data).values() if isinstance(v, np.ndarray)]
    assert sum(a.nbytes for a in arrays) < 1024
    tracemalloc.start()
    try:
        sizes = []
        for batch in data.batches(16):
            sizes.append(batch["x"].shape[0])
            assert isinstance(batch["x"], np.ndarray) and not isinstance(batch["x"], np.memmap)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sizes == [16] * 53 + [2]
    assert peak < 2 * 1024 * 1024, peak  # one batch is 196 KB; the file is 10.4 MB


def test_stored_npz_is_memory_mapped(tmp_path):
    a = rnd(40, 3, 8, 8)
    np.savez(tmp_path / "a.npz", x=a)
    data = load_calibration(tmp_path, IMG)
    assert data._files[0].arrays["x"].offset is not None
    got = np.concatenate([b["x"] for b in data.batches(7)])
    np.testing.assert_array_equal(got, a)


# ---------------------------------------------------------------- bad input


def err(tmp_path, model=IMG, **kw) -> str:
    with pytest.raises(InputError) as e:
        load_calibration(tmp_path, model, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_path_and_no_data_files(tmp_path):
    assert "does not exist" in err(tmp_path / "nope")
    (tmp_path / "readme.txt").write_text("x")
    assert "no data files" in err(tmp_path)


def test_wrong_rank_and_static_dim(tmp_path):
    np.save(tmp_path / "a.npy", rnd(2, 2, 3, 8, 8))
    msg = err(tmp_path)
    assert "a.npy" in msg and "rank 5" in msg
    np.save(tmp_path / "a.npy", rnd(2, 3, 8, 9))
    msg = err(tmp_path)
    assert "a.npy" in msg and "dim 3 is 9, expected 8" in msg


def test_dynamic_dims_accept_any_size(tmp_path):
    model = make_model([("x", TensorProto.FLOAT, ["N", 3, "H", "W"])])
    np.save(tmp_path / "a.npy", rnd(2, 3, 5, 7))
    np.save(tmp_path / "b.npy", rnd(3, 6, 6))
    shapes = [b["x"].shape for b in load_calibration(tmp_path, model).batches(8)]
    assert shapes == [(2, 3, 5, 7), (1, 3, 6, 6)]


def test_npz_missing_input_name(tmp_path):
    np.savez(tmp_path / "a.npz", ids=np.zeros((2, 3), np.int64))
    msg = err(tmp_path, TOK)
    assert "a.npz" in msg and "'mask'" in msg


def test_npz_inconsistent_batch(tmp_path):
    np.savez(tmp_path / "a.npz", ids=np.zeros((2, 3), np.int64), mask=np.zeros((3, 3), np.int64))
    assert "different batch sizes" in err(tmp_path, TOK)


def test_npy_for_multi_input_model(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 3), np.int64))
    assert ".npz" in err(tmp_path, TOK)


def test_dtype_mismatches(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((2, 3, 8, 8), np.int64))
    msg = err(tmp_path)
    assert "a.npy" in msg and "integer" in msg
    np.savez(tmp_path / "a.npz", ids=np.zeros((2, 3), np.float32), mask=np.zeros((2, 3), np.int64))
    os.remove(tmp_path / "a.npy")
    msg = err(tmp_path, TOK)
    assert "a.npz" in msg and "float" in msg and "'ids'" in msg


def test_integer_range_checked_on_cast(tmp_path):
    model = make_model([("ids", TensorProto.INT32, ["B", "S"])])
    np.save(tmp_path / "a.npy", np.array([[1, 2**40]], np.int64))
    data = load_calibration(tmp_path, model)
    with pytest.raises(InputError, match=r"a\.npy.*outside the range"):
        data.validate()
    np.save(tmp_path / "a.npy", np.array([[1, 2**30]], np.int64))
    assert next(load_calibration(tmp_path, model).batches(1))["ids"].dtype == np.int32


def test_nan_detected_when_batch_produced(tmp_path):
    a = rnd(4, 3, 8, 8)
    np.save(tmp_path / "a.npy", a)
    a[3, 0, 0, 0] = np.nan
    np.save(tmp_path / "b.npy", a)
    data = load_calibration(tmp_path, IMG)  # loading reads headers only
    assert next(data.batches(4))["x"].shape == (4, 3, 8, 8)  # a.npy is clean
    with pytest.raises(InputError, match=r"b\.npy.*NaN or Inf"):
        data.validate()
    with pytest.raises(InputError, match=r"b\.npy"):
        collect(data, 8, [7])


def test_float64_overflow_to_inf_detected(tmp_path):
    np.save(tmp_path / "a.npy", np.full((1, 3, 8, 8), 1e300))
    with pytest.raises(InputError, match=r"a\.npy.*overflow"):
        load_calibration(tmp_path, IMG).validate()


def test_labels_errors(tmp_path):
    np.save(tmp_path / "a.npy", rnd(3, 3, 8, 8))
    np.save(tmp_path / "labels.npy", np.arange(4))
    msg = err(tmp_path)
    assert "labels.npy" in msg and "4 labels for 3 samples" in msg
    np.save(tmp_path / "labels.npy", np.array([0.0, 1.0, 2.0]))
    assert "integer" in err(tmp_path)
    np.save(tmp_path / "labels.npy", np.arange(3))
    assert "does not exist" in err(tmp_path, labels=str(tmp_path / "missing.npy"))


def test_corrupt_file_skipped_or_strict(tmp_path, caplog):
    np.save(tmp_path / "a.npy", rnd(2, 3, 8, 8))
    (tmp_path / "b.npy").write_bytes(b"this is not numpy")
    np.save(tmp_path / "c.npy", rnd(1, 3, 8, 8))
    raw = (tmp_path / "c.npy").read_bytes()
    (tmp_path / "d.npy").write_bytes(raw[:-10])  # truncated data
    (tmp_path / "e.npz").write_bytes(b"PK broken zip")
    with caplog.at_level(logging.WARNING, logger="onnx_consensus"):
        data = load_calibration(tmp_path, IMG)
    assert data.n_samples == 3
    assert [os.path.basename(p) for p in data.skipped] == ["b.npy", "d.npy", "e.npz"]
    assert all(any(os.path.basename(p) in r.getMessage() for r in caplog.records) for p in data.skipped)
    msg = err(tmp_path, strict=True)
    assert "b.npy" in msg
    # labels cannot be aligned when files were skipped
    np.save(tmp_path / "labels.npy", np.arange(3))
    assert "skipped" in err(tmp_path)
    os.remove(tmp_path / "labels.npy")
    for name in ("a.npy", "c.npy"):
        os.remove(tmp_path / name)
    msg = err(tmp_path)
    assert "no readable data files" in msg


def test_corrupt_compressed_member_detected_on_read(tmp_path):
    np.savez_compressed(tmp_path / "a.npz", x=rnd(4, 3, 8, 8))
    data = load_calibration(tmp_path, IMG)
    # damage the compressed payload after indexing (headers already read)
    with zipfile.ZipFile(tmp_path / "a.npz") as zf:
        info = zf.getinfo("x.npy")
    raw = bytearray((tmp_path / "a.npz").read_bytes())
    mid = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    raw[mid: mid + 64] = bytes(64)
    (tmp_path / "a.npz").write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"a\.npz"):
        data.validate()


def test_bad_batch_size_and_indices(tmp_path):
    np.save(tmp_path / "a.npy", rnd(3, 3, 8, 8))
    data = load_calibration(tmp_path, IMG)
    with pytest.raises(InputError):
        collect(data, 0)
    with pytest.raises(InputError):
        collect(data, 2, [0, 3])


# ---------------------------------------------------------------- images


def test_images_with_pillow(tmp_path):
    from PIL import Image
    rgb = np.random.default_rng(0).integers(0, 256, (16, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    grey = np.full((8, 8), 51, np.uint8)
    Image.fromarray(grey).save(tmp_path / "b.bmp")
    (tmp_path / "c.jpg").write_bytes(b"not a jpeg")
    opts = ImageOptions(mean=(0.5,), std=(0.25,))
    data = load_calibration(tmp_path, IMG, image_options=opts)
    assert data.n_samples == 2 and [os.path.basename(p) for p in data.skipped] == ["c.jpg"]
    (batch,) = collect(data, 4)
    x = batch["x"]
    assert x.shape == (2, 3, 8, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x[1], (51 / 255 - 0.5) / 0.25, rtol=1e-5)  # grey replicated to 3 channels
    nhwc = make_model([("x", TensorProto.FLOAT, ["N", "H", "W", 3])])
    data = load_calibration(tmp_path, nhwc, image_options=ImageOptions(size=(4, 6), layout="NHWC"))
    assert next(data.batches(2))["x"].shape == (2, 4, 6, 3)
    # issue 12 failure 7: library errors name the CLI flag, not the Python API
    msg = err(tmp_path, nhwc, image_options=ImageOptions(layout="NHWC"))
    assert "--image-size" in msg and "ImageOptions" not in msg, msg
    msg = err(tmp_path, nhwc, image_options=ImageOptions(layout="NHWC", size=(4, 6), channels=1))
    assert "ImageOptions" not in msg and "channel" in msg, msg


# ---------------------------------------------------------------- bfloat16 arrays


def _bf16(a: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return a.astype(ml_dtypes.bfloat16)


def test_bfloat16_npy_and_npz_read_and_converted_to_the_input_dtype(tmp_path):
    """ml_dtypes bfloat16 arrays save as raw 2-byte voids ('<V2'); they are read as bfloat16 and converted
    exactly (every bfloat16 is a float32) for a float32 input, from .npy (memory-mapped), stored .npz and
    compressed .npz."""
    a, b, c = _bf16(rnd(3, 3, 8, 8, seed=1)), _bf16(rnd(2, 3, 8, 8, seed=2)), _bf16(rnd(3, 8, 8, seed=3))
    np.save(tmp_path / "a.npy", a)
    assert np.load(tmp_path / "a.npy").dtype == np.dtype("V2")  # what numpy alone makes of the file
    np.savez(tmp_path / "b.npz", x=b)
    np.savez_compressed(tmp_path / "c.npz", x=c)  # one sample
    data = load_calibration(tmp_path, IMG)
    assert data.n_samples == 6 and data._files[0].arrays["x"].offset is not None
    got = np.concatenate([x["x"] for x in data.batches(4)])
    assert got.dtype == np.float32
    want = np.concatenate([a, b, c[None]]).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got[:3], rnd(3, 3, 8, 8, seed=1), rtol=2**-8)  # bfloat16 keeps 8 bits


def test_bfloat16_arrays_feed_bfloat16_and_float16_inputs(tmp_path):
    import ml_dtypes

    a = _bf16(rnd(4, 3, 8, 8))
    np.save(tmp_path / "a.npy", a)
    bf_model = make_model([("x", TensorProto.BFLOAT16, ["N", 3, 8, 8])])
    (batch,) = collect(load_calibration(tmp_path, bf_model), 8)
    assert batch["x"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(batch["x"].view(np.uint16), a.view(np.uint16))  # bit for bit
    half = make_model([("x", TensorProto.FLOAT16, ["N", 3, 8, 8])])
    (batch,) = collect(load_calibration(tmp_path, half), 8)
    assert batch["x"].dtype == np.float16
    np.testing.assert_array_equal(batch["x"], a.astype(np.float32).astype(np.float16))


def test_bfloat16_arrays_checked_like_other_floats(tmp_path):
    bad = rnd(2, 3, 8, 8)
    bad[1, 0, 0, 0] = np.nan
    np.save(tmp_path / "a.npy", _bf16(bad))
    data = load_calibration(tmp_path, IMG)
    with pytest.raises(InputError, match="NaN or Inf"):
        collect(data, 8)
    with pytest.raises(InputError, match="float dtype bfloat16 .* integer"):
        load_calibration(tmp_path, make_model([("x", TensorProto.INT64, ["N", 3, 8, 8])]))
