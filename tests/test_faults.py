"""Faults: interrupts and kills at random points, a full disk. Nothing partial is left, the input is intact."""
import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

from onnx_consensus import io as io_mod
from onnx_consensus.cli import main
from onnx_consensus.report import sha256_file
from tests.conftest import temporaries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(src, calib, out):
    return [sys.executable, "-m", "onnx_consensus.cli", str(src), str(out), "--calib", str(calib),
            "--remove", "2", "--metrics", "cka", "-q", "--latency-runs", "3"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_signal_at_random_points(tmp_path, r20, sig):
    src, calib = r20
    before = sha256_file(src)
    rng = np.random.default_rng(int(sig))
    interrupted = 0
    for delay in sorted(rng.uniform(0.3, 4.0, size=3)):
        out = tmp_path / f"out-{delay:.2f}.onnx"
        p = subprocess.Popen(_cli(src, calib, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(delay)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        if p.returncode == 0:  # finished before the signal: the output must be complete
            onnx.checker.check_model(str(out), full_check=True)
        else:
            interrupted += 1
            assert p.returncode in (130, -signal.SIGKILL), (p.returncode, err)
            assert not out.exists()
            if sig != signal.SIGKILL:
                assert b"interrupted" in err
        assert temporaries(tmp_path) == []
        assert sha256_file(src) == before
    assert interrupted >= 1  # at least one signal landed mid-run


def test_disk_full_during_write(tmp_path, r20, monkeypatch, capsys):
    src, calib = r20
    before = sha256_file(src)

    class FullDisk:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io_mod.os, "fdopen", FullDisk)

    def full_save(model, path, *a, **k):  # the named-file fallback fails the same way, after a partial write
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(io_mod.onnx, "save_model", full_save)
    for anonymous in (True, False):
        if not anonymous:
            monkeypatch.setattr(io_mod, "_anonymous_file", lambda folder: None)
        out = tmp_path / "o.onnx"
        code = main([str(src), str(out), "--calib", str(calib), "--remove", "1", "--metrics", "cka", "-q",
                     "--no-latency"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "No space left on device" in err and "\n" not in err
        assert not out.exists() and temporaries(tmp_path) == []
        assert sha256_file(src) == before
