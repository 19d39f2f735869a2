"""Issue 22, item 1: files named by a model or found in a folder stay inside that folder. External data that
escapes the model's folder (``..``, an absolute path, a symbolic link out), a device or FIFO, offsets or lengths
beyond the file: one line naming the tensor, exit 2, nothing read, nothing written. The same for files beside a
decoder export (tokenizer, configs) and calibration folders (symbolic links out followed only with
``--follow-symlinks``)."""
import json
import os

import numpy as np
import onnx
import pytest

from onnx_consensus.cli import main
from onnx_consensus.errors import UnsafePathError
from onnx_consensus.paths import confined_file
from tests.helpers import residual_mlp

SECRET = b"S3CRET-BYTES-" * 100


def _model_dir(tmp_path, location="w.bin"):
    """tmp/m/m.onnx with every initializer in m/w.bin; tmp/secret.bin outside the model's folder, long
    enough to hold the weights."""
    d = tmp_path / "m"
    d.mkdir()
    model = residual_mlp(4, 16)
    onnx.save_model(model, d / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="w.bin", size_threshold=0)
    (tmp_path / "secret.bin").write_bytes(SECRET * 8)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((24, 16)).astype(np.float32))
    return d / "m.onnx"


def _point(path, location, *, offset=None, length=None, tensor=None):
    m = onnx.load(path, load_external_data=False)
    for t in m.graph.initializer:
        if tensor is not None and t.name != tensor:
            continue
        for e in t.external_data:
            if e.key == "location":
                e.value = location
            if e.key == "offset" and offset is not None:
                e.value = str(offset)
            if e.key == "length" and length is not None:
                e.value = str(length)
    onnx.save(m, path)


def _refused(tmp_path, capsys, model, *needles):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    for argv in (["inspect", str(model)],
                 [str(model), str(out / "p.onnx"), "--calib", str(tmp_path / "calib.npy"), "--remove", "1", "-q",
                  "--no-latency", "--report", str(out / "r.json")]):
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1 and err.startswith("onnx-cprune: error:"), err
        for needle in needles:
            assert needle in err, err
    assert os.listdir(out) == []


@pytest.mark.parametrize("location", ["../secret.bin", "SECRET_ABS", "sub/../../secret.bin"])
def test_external_data_outside_the_folder_refused(tmp_path, capsys, location):
    model = _model_dir(tmp_path)
    loc = str(tmp_path / "secret.bin") if location == "SECRET_ABS" else location
    _point(model, loc)
    _refused(tmp_path, capsys, model, "tensor 'w0'")


def test_external_data_symlink_out_refused_in_allowed(tmp_path, capsys):
    model = _model_dir(tmp_path)
    os.symlink(tmp_path / "secret.bin", model.parent / "link.bin")
    _point(model, "link.bin")
    _refused(tmp_path, capsys, model, "symbolic link", "tensor 'w0'")
    os.remove(model.parent / "link.bin")
    os.symlink("w.bin", model.parent / "link.bin")  # a link inside the folder is fine
    assert main(["inspect", str(model)]) == 0


def test_external_data_fifo_and_device_refused(tmp_path, capsys):
    model = _model_dir(tmp_path)
    os.mkfifo(model.parent / "fifo.bin")
    _point(model, "fifo.bin")
    _refused(tmp_path, capsys, model, "not a regular file")  # a FIFO would block the reader forever
    os.symlink("/dev/zero", model.parent / "zero.bin")
    _point(model, "zero.bin")
    _refused(tmp_path, capsys, model)


@pytest.mark.parametrize("offset,length,needle", [(10**9, None, "too short"), (0, 10**9, "too short"),
                                                  (-8, None, "negative"), (0, 4, "shorter than"),
                                                  ("x", None, "not an integer")])
def test_external_data_offsets_within_the_file(tmp_path, capsys, offset, length, needle):
    model = _model_dir(tmp_path)
    _point(model, "w.bin", offset=offset, length=length, tensor="w1")
    _refused(tmp_path, capsys, model, needle, "'w1'")


def test_confined_file_rules(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    assert confined_file(tmp_path, "a.txt", what="t") == os.path.realpath(tmp_path / "a.txt")
    for bad in ("", "/etc/passwd", "../a.txt", "missing.txt", "."):
        with pytest.raises(UnsafePathError):
            confined_file(tmp_path, bad, what="t")
    os.symlink("/etc/hostname", tmp_path / "out.txt")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        confined_file(tmp_path, "out.txt", what="t")
    if os.path.isfile("/etc/hostname"):
        assert confined_file(tmp_path, "out.txt", what="t", follow_symlinks=True) == "/etc/hostname"


def test_genai_dims_read_no_config_linked_out_of_the_folder(tmp_path):
    """inspect's cache-dim fallback reads genai_config.json only as a regular file inside the export folder: a link
    to a file outside it is not read (unless --follow-symlinks), the same rule as every other file of the folder."""
    from onnx_consensus.llm.folder_formats import genai_dims

    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"model": {"decoder": {"num_key_value_heads": 2, "head_size": 16}}}))
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "genai_config.json").symlink_to(outside)
    assert genai_dims(folder) == {}
    assert genai_dims(folder, follow_symlinks=True) == {"kv_heads": 2, "head_size": 16}
    (folder / "genai_config.json").unlink()
    (folder / "genai_config.json").write_text(outside.read_text())
    assert genai_dims(folder) == {"kv_heads": 2, "head_size": 16}
