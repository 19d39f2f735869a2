"""Faults: interrupts and kills at random points, a full disk. Nothing partial is left, the input is intact."""
import errno
import os
import signal
import subprocess
import time

import numpy as np
import onnx
import pytest

from onnx_consensus import io as io_mod
from onnx_consensus.cli import main
from onnx_consensus.report import sha256_file
from tests.helpers import CLI, ROOT, temporaries


def _cli(src, calib, out):
    return [*CLI, str(src), str(out), "--calib", str(calib),
            "--remove", "2", "--metrics", "cka", "-q", "--latency-runs", "3"]


def _catches(pid: int, sig: int) -> bool | None:
    """Whether process ``pid`` has a handler installed for ``sig`` (Linux: the SigCgt mask in
    /proc/PID/status); None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return None
    return bool(mask >> (sig - 1) & 1)


def _wait_until_ready(p: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait until the CLI's ``main`` has installed its SIGTERM handler (its first statement), or the child
    ended. Before that the child is still in Python's start-up, where no program can turn a signal into an
    orderly exit: a signal there is a kill by the signal, not what this test is about. Where /proc cannot be
    read, a fixed 0.3 s stands in."""
    end = time.monotonic() + timeout
    while p.poll() is None and time.monotonic() < end:
        ready = _catches(p.pid, signal.SIGTERM)
        if ready is None:
            time.sleep(0.3)
            return
        if ready:
            return
        time.sleep(0.005)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_signal_at_random_points(tmp_path, r20, sig):
    """A signal at three random moments of a run, counted from the moment the CLI's handlers are in place
    (the run takes about 2 s of CPU after that: imports, scoring, writing)."""
    src, calib = r20
    before = sha256_file(src)
    rng = np.random.default_rng(int(sig))
    interrupted = 0
    for delay in sorted(rng.uniform(0.0, 2.5, size=3)):
        out = tmp_path / f"out-{delay:.2f}.onnx"
        # SIG_DFL for SIGINT in the child: a test run started in the background (nohup, &) inherits SIGINT
        # ignored, and Python then never raises KeyboardInterrupt
        p = subprocess.Popen(_cli(src, calib, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        _wait_until_ready(p)
        time.sleep(delay)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        if p.returncode == 0:  # finished before the signal: the output must be complete
            onnx.checker.check_model(str(out), full_check=True)
        else:
            interrupted += 1
            # 130, or death by SIGINT after the message (the shell reports both as 130): seen since the
            # wave-3 merge on a loaded machine, cause not found yet
            assert p.returncode in (130, -signal.SIGINT, -signal.SIGKILL), (p.returncode, err)
            if sig == signal.SIGKILL and out.exists():  # killed after the rename, while exiting: complete
                onnx.checker.check_model(str(out), full_check=True)
            else:
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


def _fail_on_round(monkeypatch, n: int):
    """Make the n-th scoring round (1-based) fail the way an onnxruntime error would."""
    import onnx_consensus.pruner as pruner_mod

    real, calls = pruner_mod.score_blocks, [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : injected failure")
        return real(*args, **kwargs)
    monkeypatch.setattr(pruner_mod, "score_blocks", flaky)


def test_runtime_failure_midway_keeps_partial_when_asked(tmp_path, r20, monkeypatch, capsys):
    import json

    src, calib = r20
    before = sha256_file(src)
    args = ["--calib", str(calib), "--remove", "4", "--metrics", "cka", "-q", "--no-latency"]
    _fail_on_round(monkeypatch, 3)
    out = tmp_path / "plain.onnx"
    assert main([str(src), str(out), *args]) == 1
    err = capsys.readouterr().err
    assert "NOT_IMPLEMENTED" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and temporaries(tmp_path) == []

    _fail_on_round(monkeypatch, 3)
    out, rep = tmp_path / "partial.onnx", tmp_path / "partial.json"
    assert main([str(src), str(out), *args, "--keep-partial", "--report", str(rep)]) == 1
    report = json.loads(rep.read_text())
    assert report["partial"] is True and "NOT_IMPLEMENTED" in report["error"]
    assert len(report["removed_ids"]) == 2 and len(report["rounds"]) == 2  # rounds 1-2 done, 3 failed
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    # the partial model is exactly the replay of the two removals that were done
    assert main([str(src), str(tmp_path / "replay.onnx"), "--calib", str(calib), "--plan", str(rep), "-q",
                 "--no-latency"]) == 0
    replay = onnx.load(tmp_path / "replay.onnx")
    assert [n.output[0] for n in replay.graph.node] == [n.output[0] for n in pruned.graph.node]
    assert sha256_file(src) == before and temporaries(tmp_path) == []


def test_runtime_failure_in_first_round_keeps_report_only(tmp_path, r20, monkeypatch):
    import json

    src, calib = r20
    _fail_on_round(monkeypatch, 1)
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main([str(src), str(out), "--calib", str(calib), "--remove", "2", "--metrics", "cka", "-q",
                 "--no-latency", "--keep-partial", "--report", str(rep)]) == 1
    report = json.loads(rep.read_text())
    assert report["partial"] is True and report["removed_ids"] == [] and report["output"] is None
    assert not out.exists()


def test_finetune_runtime_failure_keeps_pruned_model(tmp_path, r20, monkeypatch, capsys):
    """onnxruntime failing inside fine-tuning (not a bridge error): exit 4, the pruned model is written."""
    pytest.importorskip("torch")
    import onnx_consensus.finetune.job as job_mod

    def broken(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : injected")
    monkeypatch.setattr(job_mod, "finetune_pruned", broken)
    src, calib = r20
    out = tmp_path / "o.onnx"
    code = main([str(src), str(out), "--calib", str(calib), "--remove", "2", "--metrics", "cka", "-q", "--no-latency",
                 "--finetune-epochs", "1"])
    assert code == 4
    assert "RUNTIME_EXCEPTION" in capsys.readouterr().err
    pruned = onnx.load(out)
    assert len(pruned.graph.node) < len(onnx.load(src).graph.node)
