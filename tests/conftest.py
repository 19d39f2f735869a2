"""Fixtures shared by the CLI-level tests, and the opt-in CPU-time table (ONNXC_TEST_CPU)."""
import os
import resource
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from threadpoolctl import threadpool_limits

from tests.helpers import resnet_onnx


@pytest.fixture(scope="module")
def r20(tmp_path_factory):
    """(model path, calibration dir): a ResNet-20 (BN folded) file and 40 random 3x32x32 samples."""
    d = tmp_path_factory.mktemp("r20")
    path = d / "r20.onnx"
    onnx.save(resnet_onnx(20, "folded"), path)
    calib = d / "calib"
    calib.mkdir()
    np.save(calib / "x.npy", np.random.default_rng(0).standard_normal((40, 3, 32, 32)).astype(np.float32))
    return path, calib


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """Small matrices: BLAS threads only contend for the two (possibly shared) cores."""
    with threadpool_limits(1):
        yield


# --- opt-in CPU-time table: ONNXC_TEST_CPU=path python -m pytest -p no:cacheprovider -----------------------
# Wall-clock durations (--durations) are useless on a shared machine; CPU seconds are not. Per test: this
# process's CPU (all its threads, time.process_time) plus the CPU of children that ended and were waited for
# during the test (subprocess CLI runs, spawned ranks; resource.getrusage(RUSAGE_CHILDREN)). Setup, call and
# teardown are included, so a module-scoped fixture is charged to the first test that uses it.
_CPU_TABLE = os.environ.get("ONNXC_TEST_CPU")
_cpu_rows: list[tuple[float, str]] = []


def _cpu_now() -> float:
    """Seconds of CPU used so far by this process and its waited-for children."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


if _CPU_TABLE:
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        start = _cpu_now()
        yield
        _cpu_rows.append((_cpu_now() - start, item.nodeid))
        with open(_CPU_TABLE + ".part", "a") as f:  # progress of a long run, in run order
            f.write(f"{_cpu_rows[-1][0]:9.2f}  {item.nodeid}\n")

    def pytest_sessionfinish(session, exitstatus):
        rows = sorted(_cpu_rows, reverse=True)
        in_tests = sum(s for s, _ in rows)
        lines = [f"{s:9.2f}  {n}" for s, n in rows]
        lines += [f"{in_tests:9.2f}  TOTAL in {len(rows)} tests",
                  f"{_cpu_now():9.2f}  TOTAL session (imports and collection included)"]
        Path(_CPU_TABLE).write_text("\n".join(lines) + "\n")
        Path(_CPU_TABLE + ".part").unlink(missing_ok=True)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The folder ``tools.data.build_llms --tiny`` writes (random-weight tiny Llamas: llama/, llama_drop<i>/, each
    with hf/ and genai_<precision>/), built once per test process for the decoder tests that share it."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import env_with_root

    out = tmp_path_factory.mktemp("genai") / "tiny"
    r = subprocess.run([sys.executable, "-m", "tools.data.build_llms", "--tiny", str(out)],
                       cwd=Path(__file__).resolve().parents[1], env=env_with_root(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def calib(tmp_path_factory):
    """3,000 random words of the tiny tokenizer's vocabulary (w0..w254), as calibration text."""
    import numpy as np

    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(" ".join(f"w{i}" for i in np.random.default_rng(0).integers(0, 255, 3000)))
    return path
