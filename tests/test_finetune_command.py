"""`onnx-cprune finetune` (issue 15): supervised and distillation runs end to end, the interface kept, the input
never modified, failures that leave nothing, prune's fine-tuning through the same code, devices and AMP, the
onnxruntime providers reaching every session, and a two-process gloo run through torchrun's launcher."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnx_consensus.cli import main
from onnx_consensus.errors import FinetuneError, InputError
from onnx_consensus.runtime import current_providers, resolve_providers, using_providers
from tests.helpers import env_with_root, residual_mlp, run, temporaries

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """teacher t.onnx, student s.onnx (same graph, other weights: a stand-in for a pruned model), data dirs
    lab/ (labels = the teacher's classes), unlab/ (no labels); N samples of 16 features."""
    d = tmp_path_factory.mktemp("ftcmd")
    teacher, student = residual_mlp(4, 16, seed=0), residual_mlp(4, 16, seed=1)
    onnx.save(teacher, d / "t.onnx")
    onnx.save(student, d / "s.onnx")
    x = np.random.default_rng(0).standard_normal((N, 16)).astype(np.float32)
    for name in ("lab", "unlab"):
        (d / name).mkdir()
        np.save(d / name / "x.npy", x)
    np.save(d / "lab" / "labels.npy", run(teacher, {"x": x})[0].argmax(1))
    return d


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _weights(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def _accuracy(path, d) -> float:
    x, y = np.load(d / "lab" / "x.npy"), np.load(d / "lab" / "labels.npy")
    return float(np.mean(run(onnx.load(path), {"x": x})[0].argmax(1) == y))


def _args(d, out, *extra):
    return ["finetune", str(d / "s.onnx"), str(out), "--finetune-epochs", "2", "--ft-batch-size", "8", "--lr", "0.05",
            "--threads", "1", "-q", *extra]


@pytest.mark.parametrize("mode", ["supervised", "distillation"])
def test_finetune_end_to_end(tmp_path, files, mode, capsys):
    d = files
    before = _sha(d / "s.onnx")
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    train = d / ("lab" if mode == "supervised" else "unlab")
    teacher = ["--teacher", str(d / "t.onnx")] if mode == "distillation" else []
    assert main(_args(d, out, "--train", str(train), "--eval", str(d / "lab"), "--report", str(rep), *teacher)) == 0
    assert _sha(d / "s.onnx") == before  # input never modified
    info = json.loads(rep.read_text())
    assert info["mode"] == mode and info["metric"] == "accuracy" and info["images_seen"] == 2 * N
    # before / after are onnxruntime's accuracies of the input and of the written model
    assert info["metric_before"] == pytest.approx(_accuracy(d / "s.onnx", d), abs=1e-9)
    assert info["metric_after"] == pytest.approx(_accuracy(out, d), abs=1e-9)
    assert info["metric_after"] > info["metric_before"]
    assert (info["metric_original"] == 1.0) if mode == "distillation" else info["metric_original"] is None
    # same graph and interface, new weights
    src, got = onnx.load(d / "s.onnx"), onnx.load(out)
    onnx.checker.check_model(got, full_check=True)
    assert [(n.op_type, list(n.input), list(n.output)) for n in got.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in src.graph.node]
    assert got.graph.input == src.graph.input and got.graph.output == src.graph.output
    assert got.opset_import == src.opset_import
    w0, w1 = _weights(d / "s.onnx"), _weights(out)
    assert w0.keys() == w1.keys() and any(not np.array_equal(w0[k], w1[k]) for k in w0)
    assert all(w1[k].dtype == w0[k].dtype for k in w0)
    text = capsys.readouterr().out
    assert "accuracy on" in text and "before" in text and f"Wrote {out}" in text


def test_distillation_without_teacher_is_one_line_and_writes_nothing(tmp_path, files, capsys):
    out = tmp_path / "o.onnx"
    assert main(_args(files, out, "--train", str(files / "unlab"))) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--teacher" in err
    assert not out.exists() and temporaries(tmp_path) == []


def test_teacher_with_other_inputs_is_refused(tmp_path, files, capsys):
    other = residual_mlp(4, 16, seed=0)
    other.graph.input[0].name = "y"
    for n in other.graph.node:
        n.input[:] = ["y" if i == "x" else i for i in n.input]
    onnx.save(other, tmp_path / "other.onnx")
    assert main(_args(files, tmp_path / "o.onnx", "--train", str(files / "unlab"), "--teacher",
                      str(tmp_path / "other.onnx"))) == 2
    assert "teacher" in capsys.readouterr().err


def test_failure_leaves_nothing(tmp_path, files, monkeypatch, capsys):
    import onnx_consensus.finetune.train as train

    def boom(*a, **k):
        raise FinetuneError("fine-tuning failed: RuntimeError: simulated")
    monkeypatch.setattr(train, "finetune", boom)
    out = tmp_path / "o.onnx"
    assert main(_args(files, out, "--train", str(files / "lab"), "--report", str(tmp_path / "r.json"))) == 4
    assert "simulated" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "r.json").exists() and temporaries(tmp_path) == []


def test_prune_finetune_runs_the_same_code(tmp_path, monkeypatch):
    """`prune --finetune-epochs` goes through finetune.job.finetune_model, as `finetune` does."""
    import onnx_consensus.finetune.job as job

    calls = []
    real = job.finetune_model

    def spy(*a, **k):
        calls.append(k["config"])
        return real(*a, **k)
    monkeypatch.setattr(job, "finetune_model", spy)
    model = residual_mlp(6, 16, seed=0)
    onnx.save(model, tmp_path / "m.onnx")
    (tmp_path / "c").mkdir()
    np.save(tmp_path / "c" / "x.npy", np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32))
    assert main([str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "c"), "--remove", "1",
                 "--metrics", "cka", "-q", "--no-latency", "--finetune-epochs", "1", "--ft-batch-size", "8"]) == 0
    assert len(calls) == 1 and calls[0].epochs == 1 and calls[0].batch_size == 8


# ---- devices and mixed precision -----------------------------------------------------------------

@pytest.mark.parametrize("flags,message", [
    (["--device", "cuda"], "CUDA is not available"),
    (["--device", "tpu"], "unknown --device"),
    (["--amp", "fp16"], "--amp fp16 needs a CUDA device"),
])
def test_unusable_device_or_precision_is_one_line(tmp_path, files, capsys, flags, message):
    import torch

    if torch.cuda.is_available() and "cuda" in flags:
        pytest.skip("this machine has CUDA")
    out = tmp_path / "o.onnx"
    assert main(_args(files, out, "--train", str(files / "lab"), *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and not out.exists()


def test_prune_checks_the_device_before_pruning(tmp_path, files, capsys):
    assert main([str(files / "t.onnx"), str(tmp_path / "o.onnx"), "--calib", str(files / "lab"), "--remove", "1",
                 "--finetune-epochs", "1", "--amp", "fp16"]) == 2
    assert "--amp fp16 needs a CUDA device" in capsys.readouterr().err


def test_bf16_autocast_on_cpu_trains_and_keeps_float32_weights(tmp_path, files):
    out32, out16 = tmp_path / "o32.onnx", tmp_path / "o16.onnx"
    assert main(_args(files, out32, "--train", str(files / "lab"))) == 0
    assert main(_args(files, out16, "--train", str(files / "lab"), "--amp", "bf16")) == 0
    w0, w32, w16 = _weights(files / "s.onnx"), _weights(out32), _weights(out16)
    for k in w0:
        assert w16[k].dtype == np.float32
    step32 = np.concatenate([(w32[k] - w0[k]).ravel() for k in w0])
    step16 = np.concatenate([(w16[k] - w0[k]).ravel() for k in w0])
    # the same updates up to bfloat16's ~3 significant digits in the forward pass, but not bit-identical
    assert not np.array_equal(step16, step32)
    assert np.dot(step16, step32) / (np.linalg.norm(step16) * np.linalg.norm(step32)) > 0.95


# ---- onnxruntime providers -----------------------------------------------------------------------

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def test_resolve_providers_rules(caplog):
    assert resolve_providers(None) == (CPU,) and resolve_providers(["cpu"], [CPU]) == (CPU,)
    assert resolve_providers(["cuda", "cpu"], [CUDA, CPU]) == (CUDA, CPU)
    assert resolve_providers(["cuda:1", "cpu"], [CUDA, CPU]) == ((CUDA, {"device_id": "1"}), CPU)
    assert resolve_providers(["cuda"], [CUDA, CPU], device_id=3) == ((CUDA, {"device_id": "3"}),)
    with pytest.raises(InputError, match=r"CUDAExecutionProvider is not available .*onnx-consensus\[gpu\]"):
        resolve_providers(["cuda"], [CPU])
    with caplog.at_level(logging.WARNING, logger="onnx_consensus"):
        assert resolve_providers(["cuda", "cpu"], [CPU]) == (CPU,)
    assert "falling back to CPUExecutionProvider" in caplog.text and "onnx-consensus[gpu]" in caplog.text
    with pytest.raises(InputError, match="unknown onnxruntime provider"):
        resolve_providers(["gpu"], [CPU])
    with using_providers((CUDA, CPU)):
        assert current_providers() == (CUDA, CPU)
    assert current_providers() == (CPU,)


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_missing_provider_is_the_documented_error(tmp_path, files, capsys):
    assert main([str(files / "t.onnx"), str(tmp_path / "o.onnx"), "--calib", str(files / "lab"), "--remove", "1",
                 "--providers", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("onnx-cprune: error: onnxruntime provider CUDAExecutionProvider is not available")
    assert "pip install 'onnx-consensus[gpu]'" in err and err.count("\n") == 0


@pytest.fixture
def recorded_sessions(monkeypatch):
    """Pretend CUDA is installed; record the providers of every InferenceSession made anywhere, then build it
    on the CPU (which is what this machine has)."""
    seen = []
    real = ort.InferenceSession

    def session(path_or_bytes, sess_options=None, providers=None, **kw):
        seen.append(list(providers or []))
        return real(path_or_bytes, sess_options, providers=[CPU], **kw)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", session)
    return seen


def test_providers_reach_every_prune_session(tmp_path, files, recorded_sessions):
    """Scoring, hold-out fidelity, latency, the fine-tuning teacher and the evaluation all get the providers."""
    assert main([str(files / "t.onnx"), str(tmp_path / "o.onnx"), "--calib", str(files / "unlab"), "--remove", "1",
                 "--metrics", "cka", "-q", "--latency-runs", "2", "--finetune-epochs", "1", "--ft-batch-size", "8",
                 "--eval", str(files / "lab"), "--providers", "cuda:0,cpu"]) == 0
    on_cuda = [p for p in recorded_sessions if p and p[0] == (CUDA, {"device_id": "0"})]
    # all but the written file's onnxruntime check (io.save_model_atomic) ran on the providers asked for
    assert len(on_cuda) >= 6 and len(recorded_sessions) - len(on_cuda) <= 1, recorded_sessions


def test_providers_reach_every_finetune_session(tmp_path, files, recorded_sessions):
    assert main(_args(files, tmp_path / "o.onnx", "--train", str(files / "unlab"), "--teacher",
                      str(files / "t.onnx"), "--eval", str(files / "lab"), "--providers", "cuda,cpu")) == 0
    # teacher, evaluation reference and one evaluation per model (before, 2 epochs), then the write check
    assert all(p == [CUDA, CPU] for p in recorded_sessions[:-1]) and len(recorded_sessions) >= 5, recorded_sessions


def test_bench_takes_providers(tmp_path, files, recorded_sessions, capsys):
    assert main(["bench", str(files / "t.onnx"), "--batch-sizes", "1", "--runs", "2", "--warmup", "1",
                 "--providers", "cuda,cpu"]) == 0
    assert recorded_sessions and all(p == [CUDA, CPU] for p in recorded_sessions)
    assert "onnxruntime cuda,cpu" in capsys.readouterr().out


# ---- two gloo processes through torchrun's launcher ----------------------------------------------

def test_two_gloo_processes_through_the_cli_match_one(tmp_path, files):
    """`python -m torch.distributed.run --nproc_per_node 2 -m onnx_consensus finetune ...` (global batch 8 as
    2 x 4) writes, from rank 0 only, the weights one process computes with batch 8."""
    one, two = tmp_path / "one.onnx", tmp_path / "two.onnx"
    flags = ["--train", str(files / "unlab"), "--teacher", str(files / "t.onnx"), "--eval", str(files / "lab")]
    assert main(_args(files, one, *flags)) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "onnx_consensus", *_args(files, two, *flags, "--report", str(tmp_path / "r.json"))]
    env = dict(env_with_root(), OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("Fine-tuned") == 1 and p.stdout.count(f"Wrote {two}") == 1  # rank 0 only
    info = json.loads((tmp_path / "r.json").read_text())
    assert info["processes"] == 2 and info["images_seen"] == 2 * N
    w1, w2 = _weights(one), _weights(two)
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=1e-5, atol=1e-6)
    assert temporaries(tmp_path) == []


def test_finetune_defaults_to_one_epoch_and_a_global_batch_that_splits():
    from onnx_consensus.cli.finetune import _config
    from onnx_consensus.cli.parser import build_parser
    from onnx_consensus.options import FinetuneConfig
    from onnx_consensus.finetune import check_config

    ns = build_parser().parse_args(["finetune", "s.onnx", "o.onnx", "--train", "d"])
    assert _config(ns).epochs == 1 and _config(ns) == FinetuneConfig()
    ns = build_parser().parse_args(["finetune", "s.onnx", "o.onnx", "--train", "d", "--finetune-epochs", "0"])
    with pytest.raises(InputError, match="must be >= 1"):
        check_config(_config(ns))
    with pytest.raises(InputError, match="global batch and must split evenly over 2 processes"):
        check_config(FinetuneConfig(batch_size=7), world_size=2)
    check_config(FinetuneConfig(batch_size=8), world_size=2)
