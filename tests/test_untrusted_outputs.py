"""Issue 22, item 2: outputs. The model and every side file get the mode an ordinary open() gives under the
user's umask; writes never follow a symbolic link planted at the output's (or a temporary) name; a previous
output's data file is never truncated in place; a decoder export folder's tokenizer linking out of it is not
copied. Plus the calibration folders' symbolic links (item 1), followed only with --follow-symlinks."""
import json
import os
import stat

import numpy as np
import onnx
import pytest

from onnx_consensus import io as oio
from onnx_consensus.cli import main
from onnx_consensus.llm.folder import prune_folder
from tests.helpers import residual_mlp, temporaries
from tests.test_decoder_llm import L, synthetic_decoder


@pytest.fixture
def umask027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _prune(tmp_path, src, out, *extra):
    calib = tmp_path / "calib.npy"
    if not calib.exists():
        np.save(calib, np.random.default_rng(0).standard_normal((24, 16)).astype(np.float32))
    return main([str(src), str(out), "--calib", str(calib), "--remove", "1", "-q", "--no-latency", *extra])


@pytest.mark.parametrize("external", [False, True])
def test_outputs_get_the_umask_mode(tmp_path, umask027, external):
    src = tmp_path / "m.onnx"
    if external:
        onnx.save_model(residual_mlp(4, 16), src, save_as_external_data=True, location="m.bin", size_threshold=0)
    else:
        onnx.save(residual_mlp(4, 16), src)
    out = tmp_path / "out"
    out.mkdir()
    assert _prune(tmp_path, src, out / "p.onnx", "--report", str(out / "r.json")) == 0
    files = sorted(os.listdir(out))
    assert files == (["p.onnx", "p.onnx.data", "r.json"] if external else ["p.onnx", "r.json"])
    assert {f: oct(_mode(out / f)) for f in files} == {f: oct(umask027) for f in files}


def test_write_helpers_modes_and_no_leftovers(tmp_path, umask027):
    oio.write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert _mode(tmp_path / "a.json") == umask027 and json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    with pytest.raises(ZeroDivisionError):
        with oio.atomic_file(tmp_path / "b.bin") as (f, _):
            f.write(b"partial")
            1 / 0
    assert sorted(os.listdir(tmp_path)) == ["a.json"]  # nothing left by the failed write
    fd, tmp = oio.create_temporary(str(tmp_path), "c")
    os.close(fd)
    assert _mode(tmp) == umask027 and os.path.basename(tmp).startswith(".c.")


def test_atomic_folder_mode_rename_and_no_leftovers(tmp_path, umask027):
    """A folder is filled under a temporary name and renamed whole (an empty folder there replaced); the mode is
    mkdir's under the umask, not mkdtemp's 0700; a failure midway leaves neither it nor the temporary."""
    (tmp_path / "empty").mkdir()
    with oio.atomic_folder(tmp_path / "empty") as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and not (tmp_path / "empty" / "f").exists()
        (open(os.path.join(tmp, "f"), "w")).close()
    assert os.listdir(tmp_path / "empty") == ["f"] and _mode(tmp_path / "empty") == 0o777 & ~0o027
    with pytest.raises(ZeroDivisionError):
        with oio.atomic_folder(tmp_path / "new") as tmp:
            (open(os.path.join(tmp, "f"), "w")).close()
            1 / 0
    assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_planted_symlinks_are_replaced_not_followed(tmp_path):
    """Links planted at the output's names (model, .data, report) are replaced by the files; their targets keep
    their bytes. So does a link at the report's old fixed temporary name (``r.json.tmp``)."""
    src = tmp_path / "m.onnx"
    onnx.save_model(residual_mlp(4, 16), src, save_as_external_data=True, location="m.bin", size_threshold=0)
    out = tmp_path / "out"
    out.mkdir()
    victims = {}
    for name in ("p.onnx", "p.onnx.data", "r.json", "r.json.tmp"):
        victim = tmp_path / f"victim_{name}"
        victim.write_bytes(b"precious " + name.encode())
        victims[victim] = victim.read_bytes()
        os.symlink(victim, out / name)
    assert _prune(tmp_path, src, out / "p.onnx", "--report", str(out / "r.json")) == 0
    assert all(v.read_bytes() == b for v, b in victims.items())
    assert all(not os.path.islink(out / n) for n in ("p.onnx", "p.onnx.data", "r.json"))
    onnx.checker.check_model(str(out / "p.onnx"), full_check=True)


def test_temporary_names_never_reuse_an_existing_file(tmp_path, monkeypatch):
    """A link planted at the next temporary name is not written through: creation is O_EXCL|O_NOFOLLOW and
    takes another name."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    names = iter(["aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(oio.secrets, "token_hex", lambda n: next(names))
    os.symlink(victim, tmp_path / ".r.json.aaaaaaaa.tmp")
    oio.write_json_atomic(tmp_path / "r.json", {"ok": True})
    assert victim.read_bytes() == b"keep" and json.loads((tmp_path / "r.json").read_text()) == {"ok": True}


def test_previous_data_file_never_truncated_in_place(tmp_path):
    """The previous output's .data (hard-linked elsewhere here, so its inode can be watched) keeps its bytes,
    whether the new write succeeds or fails its check."""
    src = tmp_path / "m.onnx"
    onnx.save_model(residual_mlp(4, 16), src, save_as_external_data=True, location="m.bin", size_threshold=0)
    out = tmp_path / "out"
    out.mkdir()
    assert _prune(tmp_path, src, out / "p.onnx") == 0
    os.link(out / "p.onnx.data", tmp_path / "watch")
    before = (tmp_path / "watch").read_bytes()
    model = onnx.load(src)
    bad = {"x": np.zeros((2, 3), np.float32)}  # the wrong width: the onnxruntime check fails
    with pytest.raises(Exception):
        oio.save_model_atomic(model, out / "p.onnx", bad, external_data=True)
    assert (tmp_path / "watch").read_bytes() == before and temporaries(out) == []
    oio.save_model_atomic(model, out / "p.onnx", {"x": np.zeros((2, 16), np.float32)}, external_data=True)
    assert (tmp_path / "watch").read_bytes() == before
    assert os.path.getsize(out / "p.onnx.data") != len(before)  # the new (unpruned) weights went elsewhere


def _export(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(synthetic_decoder("plain"), str(src / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    (src / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"num_hidden_layers": L,
                                                                               "filename": "model.onnx"}}}))
    return src


def test_export_folder_mode_and_side_files_confined(tmp_path, umask027):
    src = _export(tmp_path)
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", src / "tokenizer.json")
    with pytest.raises(Exception, match="symbolic link"):
        prune_folder(src, tmp_path / "out", [2])
    assert not os.path.exists(tmp_path / "out") and not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    prune_folder(src, tmp_path / "out", [2], follow_symlinks=True)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "secret"
    assert _mode(tmp_path / "out") == 0o750
    assert {f: _mode(tmp_path / "out" / f) for f in os.listdir(tmp_path / "out")} == \
        {f: umask027 for f in os.listdir(tmp_path / "out")}


def test_genai_config_cannot_name_a_model_outside_the_folder(tmp_path):
    src = _export(tmp_path)
    os.replace(src / "model.onnx", tmp_path / "model.onnx")
    (src / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "../model.onnx"}}}))
    with pytest.raises(Exception, match="outside"):
        prune_folder(src, tmp_path / "out", [2])
    assert main(["inspect", str(src)]) == 2


def test_calibration_symlinks_out_of_the_folder(tmp_path, capsys):
    onnx.save(residual_mlp(4, 16), tmp_path / "m.onnx")
    calib, elsewhere = tmp_path / "calib", tmp_path / "elsewhere"
    calib.mkdir()
    elsewhere.mkdir()
    x = np.random.default_rng(0).standard_normal((24, 16)).astype(np.float32)
    np.save(calib / "a.npy", x)
    np.save(elsewhere / "b.npy", x)
    os.symlink(elsewhere / "b.npy", calib / "b.npy")
    argv = [str(tmp_path / "m.onnx"), str(tmp_path / "p.onnx"), "--calib", str(calib), "--remove", "1", "-q",
            "--no-latency"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--follow-symlinks" in err and "b.npy" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.onnx").exists()
    assert main(argv + ["--follow-symlinks"]) == 0
    os.remove(calib / "b.npy")
    os.mkfifo(calib / "c.npy")  # a FIFO would block the header read forever
    assert main(argv) == 2 and "not a regular file" in capsys.readouterr().err


def test_decoder_text_and_tokenizer_links_out_of_their_folders(tmp_path):
    """Text folders and the tokenizer found beside a model follow the data folders' rule; a --tokenizer the
    user names is read wherever it is."""
    from onnx_consensus.errors import UnsafePathError
    from onnx_consensus.llm.text import find_tokenizer, load_text
    from tests.test_llm_prune import _tokenizer

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tok = _tokenizer(elsewhere / "tokenizer.json")
    (elsewhere / "b.txt").write_text("w6 w7 w8 w9")
    model_dir, text = tmp_path / "m", tmp_path / "t"
    model_dir.mkdir()
    text.mkdir()
    os.symlink(tok, model_dir / "tokenizer.json")
    with pytest.raises(UnsafePathError, match="--follow-symlinks or --tokenizer"):
        find_tokenizer(model_dir / "model.onnx")
    assert find_tokenizer(model_dir / "model.onnx", follow_symlinks=True) == os.path.realpath(tok)
    assert find_tokenizer(model_dir / "model.onnx", given=tok) == str(tok)
    (text / "a.txt").write_text("w1 w2 w3 w4")
    os.symlink(elsewhere / "b.txt", text / "b.txt")
    with pytest.raises(UnsafePathError, match="b.txt"):
        load_text(text, tok, seq_len=4)
    assert load_text(text, tok, seq_len=4, follow_symlinks=True).n_samples == 2
