"""runtime.SHARED_ARENA: sessions built one after another draw their intermediate tensors from one process-wide
arena, so live sessions do not multiply memory as sessions with their own arenas do; outputs are unchanged.
Memory is read from /proc/self/status in a fresh process (a test worker's earlier allocations would blur it)."""
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_consensus.runtime import SHARED_ARENA, make_session

N = 1 << 24  # 64 MiB of float32 per intermediate

PROGRAM = r"""
import sys
import numpy as np, onnx
from onnx import TensorProto, helper
from onnx_consensus.runtime import make_session

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024

arena = {"shared": "shared", "own": True}[sys.argv[1]]
g = helper.make_graph([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
                       helper.make_node("ReduceSum", ["b"], ["y"], keepdims=0)], "g",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [%(n)d])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
x = np.ones(%(n)d, np.float32)
live = []
for k in range(5):
    live.append(make_session(model, level="disable", threads=1, arena=arena))
    live[-1].run(None, {"x": x})
    if k == 0:
        start = rss()
print(rss() - start)
""" % {"n": N}


def _growth(kind: str) -> int:
    """RSS bytes added by 4 more live sessions after the first one's run."""
    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", PROGRAM, kind], capture_output=True, text=True, cwd=root,
                         check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_live_sessions_share_one_arena():
    own, shared = _growth("own"), _growth("shared")
    assert own > 3 * 4 * N  # each session's own arena keeps its run's two 64 MiB intermediates
    assert shared < 4 * N  # the shared arena is reused: less than one intermediate more for 4 sessions


def test_shared_arena_sessions_compute_the_same():
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Tanh", ["h"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
                          [onnx.numpy_helper.from_array(np.linspace(-1, 1, 24, dtype=np.float32).reshape(8, 3), "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    ref = make_session(model, arena=False).run(None, {"x": x})[0]
    for _ in range(2):
        np.testing.assert_array_equal(make_session(model, arena=SHARED_ARENA).run(None, {"x": x})[0], ref)
