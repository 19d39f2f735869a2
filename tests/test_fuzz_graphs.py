"""Property tests on random residual networks (tests/graphgen.py): detection against the generator's ground
truth, pruning any subset of candidates, exactness of removing zeroed blocks, and the input file untouched.

Default run: derandomized (repeatable), 370 examples in total (30-120 per property; every required
generator feature has a share >= 10%, test_generator_feature_shares). ``-m slow``: 2,000 more, random, and
10,000 hostile files (section 6: tests/hostile.py's graphs, external data and data files, each refused in one
line within 30 s with nothing written).
Regression tests for bugs the fuzzer found are plain functions at the end of the file.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnx_consensus.graph.blocks import find_blocks
from onnx_consensus.graph.ir import interface
from onnx_consensus.graph.surgery import remove_blocks
from tests import hostile
from tests.graphgen import BATCH, GenGraph, residual_nets
from tests.helpers import zero_branch

BATCHES = (1, 3)


# FUZZ_NO_SHRINK=1 skips shrinking (quick mutation checks of the suite itself).
_PHASES = (Phase.explicit, Phase.generate) if os.environ.get("FUZZ_NO_SHRINK") else tuple(Phase)


def _settings(n: int, *, slow: bool = False):
    return settings(deadline=None, max_examples=n, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=not slow, database=None, print_blob=slow, phases=_PHASES)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _run(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def _consumers(model: onnx.ModelProto) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n.output[0])
    return out


# ---------------------------------------------------------------------------------------------------------
# 1. Detection matches the ground truth
# ---------------------------------------------------------------------------------------------------------

def check_detection(gen: GenGraph) -> None:
    model = gen.model
    onnx.checker.check_model(model, full_check=True)  # the generator builds valid models
    before = model.SerializeToString()
    report = find_blocks(model)
    assert model.SerializeToString() == before, "find_blocks modified its input"
    ctx = "\n" + gen.describe()

    detected = {b.merge: b for b in report.blocks}
    truth = {b.merge: b for b in gen.removable}
    assert len(detected) == len(report.blocks), f"two blocks share a merge{ctx}"
    missed = sorted(set(truth) - set(detected))
    extra = sorted(set(detected) - set(truth))
    assert not missed and not extra, f"missed {missed}, spurious {extra}{ctx}"

    for merge, t in truth.items():
        d = detected[merge]
        assert (d.entry, d.exit, d.id) == (t.entry, t.exit, t.exit), f"block {t.index}: {d}{ctx}"
        assert set(d.nodes) == set(t.nodes) and len(d.nodes) == len(t.nodes), f"block {t.index}: {d.nodes}{ctx}"
        assert d.nodes[-1] == t.exit, f"block {t.index}: the exit's node is not last: {d.nodes}{ctx}"
        assert set(d.side_inputs) == set(t.side_inputs), f"block {t.index}: {d.side_inputs} vs {t.side_inputs}{ctx}"
        # Static dims must match exactly; a symbolic dim may carry another name when a graph output declares
        # its own (shape inference keeps declared names), so any symbolic name stands for the batch dim.
        got = tuple(x if isinstance(x, int) else BATCH for x in d.shape)
        assert got == t.shape and d.dtype == "float32", f"{d}{ctx}"
        assert d.macs == t.macs, f"block {t.index}: MACs {d.macs} vs {t.macs}{ctx}"
        assert d.stage == t.stage, f"block {t.index}: stage {d.stage} vs {t.stage}{ctx}"

    # Identity-skip merges that cannot be removed are reported, with a reason.
    reported = {n.merge: n.reason for n in report.not_removable}
    for blk in gen.blocks:
        if blk.kind in ("identity", "broadcast") and not blk.removable:
            assert blk.merge in reported, f"block {blk.index} ({blk.reason}) not reported{ctx}"

    # Independently of the ground truth: every candidate is single-exit (no inner tensor is a graph output
    # or read outside the block), its entry/exit agree in shape, and blocks are disjoint and ordered.
    outputs = {o.name for o in model.graph.output}
    consumers = _consumers(model)
    seen: set[str] = set()
    for d in report.blocks:
        members = set(d.nodes)
        assert not (members & seen), f"overlapping blocks{ctx}"
        seen |= members
        for key in d.nodes:
            if key == d.exit:
                continue
            assert key not in outputs, f"{d.id}: inner tensor {key} is a graph output{ctx}"
            assert all(c in members for c in consumers.get(key, [])), f"{d.id}: {key} read outside{ctx}"
    assert [b.position for b in report.blocks] == sorted(b.position for b in report.blocks)
    stages = [b.stage for b in report.blocks]
    first_seen = list(dict.fromkeys(stages))  # stages are numbered in order of first appearance
    assert first_seen == list(range(len(first_seen)))


@_settings(120)
@given(residual_nets())
def test_detection_matches_ground_truth(gen):
    check_detection(gen)


@pytest.mark.slow
@_settings(700, slow=True)
@given(residual_nets())
def test_detection_matches_ground_truth_slow(gen):
    check_detection(gen)


# ---------------------------------------------------------------------------------------------------------
# 2. Pruning any subset of the candidates gives a valid model with the original interface
# ---------------------------------------------------------------------------------------------------------

def check_prune_subset(gen: GenGraph, pick) -> None:
    model = gen.model
    report = find_blocks(model)
    chosen = [report.blocks[i] for i in pick(len(report.blocks))]
    ctx = "\n" + gen.describe() + f"\nremoved: {[b.id for b in chosen]}"
    pruned = remove_blocks(model, chosen)
    onnx.checker.check_model(pruned, full_check=True)
    assert interface(pruned) == interface(model), ctx
    ins, outs = interface(pruned)
    assert all(s.shape and s.shape[0] == gen.batch for s in ins if gen.inputs[s.name][1] == "x"), ctx
    if not gen.features["loose_output"]:
        assert all(s.shape and s.shape[0] == gen.batch for s in outs), ctx

    # Exactly the blocks' nodes are gone; an exit that is a graph output is now Identity(entry).
    outputs = {o.name for o in model.graph.output}
    n_bypass = sum(b.exit in outputs for b in chosen)
    assert len(pruned.graph.node) == len(model.graph.node) - sum(len(b.nodes) for b in chosen) + n_bypass, ctx
    produced = {n.output[0]: n for n in pruned.graph.node}
    for b in chosen:
        for key in b.nodes:
            if key == b.exit and key in outputs:
                assert produced[key].op_type == "Identity", ctx
            else:
                assert key not in produced, f"{key} of block {b.id} still computed{ctx}"

    rng = np.random.default_rng(0)
    for batch in BATCHES:
        got = _run(pruned, gen.feeds(batch, rng, nonneg=False))
        assert list(got) == [o.name for o in model.graph.output], ctx
        for spec in outs:
            assert got[spec.name].dtype == np.float32
            if spec.shape is not None:
                want = tuple(batch if d == gen.batch else d for d in spec.shape)
                assert len(got[spec.name].shape) == len(want), ctx
                assert all(w is None or isinstance(w, str) or g == w for g, w in zip(got[spec.name].shape, want)), ctx


def _subset_picker(data):
    return lambda n: data.draw(st.lists(st.integers(0, n - 1), unique=True), label="removed") if n else []


@_settings(100)
@given(residual_nets(), st.data())
def test_pruning_any_subset_keeps_a_valid_model(gen, data):
    check_prune_subset(gen, _subset_picker(data))


@pytest.mark.slow
@_settings(500, slow=True)
@given(residual_nets(), st.data())
def test_pruning_any_subset_keeps_a_valid_model_slow(gen, data):
    check_prune_subset(gen, _subset_picker(data))


# ---------------------------------------------------------------------------------------------------------
# 3. Zeroed blocks are removed exactly
# ---------------------------------------------------------------------------------------------------------

def _exact_when_zeroed(blk) -> bool:
    """The block is an identity when its branch is zero: no activation in the block, or a ReLU whose
    input (the entry) is non-negative (X is fed >= 0 data)."""
    return blk.exit == blk.merge or blk.entry_nonneg


def check_zeroed_removal(gen: GenGraph, pick) -> None:
    eligible = [b for b in gen.removable if _exact_when_zeroed(b)]
    assume(eligible)
    chosen = [eligible[i] for i in pick(len(eligible))]
    model = _copy(gen.model)
    for blk in chosen:
        zero_branch(model, blk)
    ctx = "\n" + gen.describe() + f"\nzeroed and removed: {[b.index for b in chosen]}"
    report = find_blocks(model)
    detected = {b.merge: b for b in report.blocks}
    assert all(b.merge in detected for b in chosen), ctx
    pruned = remove_blocks(model, [detected[b.merge] for b in chosen])
    assert len(pruned.graph.node) < len(model.graph.node), ctx
    rng = np.random.default_rng(1)
    for batch in BATCHES:
        feeds = gen.feeds(batch, rng, nonneg=True)
        want, got = _run(model, feeds), _run(pruned, feeds)
        assert list(got) == list(want), ctx
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=f"{name}{ctx}")


def _nonempty_picker(data):
    return lambda n: data.draw(st.lists(st.integers(0, n - 1), min_size=1, unique=True), label="zeroed")


@_settings(80)
@given(residual_nets(), st.data())
def test_zeroed_blocks_are_removed_exactly(gen, data):
    check_zeroed_removal(gen, _nonempty_picker(data))


@pytest.mark.slow
@_settings(500, slow=True)
@given(residual_nets(), st.data())
def test_zeroed_blocks_are_removed_exactly_slow(gen, data):
    check_zeroed_removal(gen, _nonempty_picker(data))


# ---------------------------------------------------------------------------------------------------------
# 4. The input file is not touched
# ---------------------------------------------------------------------------------------------------------

def check_input_file_unchanged(gen: GenGraph) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save(gen.model, path)
        with open(path, "rb") as f:
            file_before = f.read()
        loaded = onnx.load(path)
        proto_before = loaded.SerializeToString()
        report = find_blocks(loaded)
        pruned = remove_blocks(loaded, report.blocks)
        if report.blocks:
            assert len(pruned.graph.node) < len(loaded.graph.node)
        pruned.graph.node[0].name += "_touched"  # the result must not alias the input
        pruned.graph.doc_string = "touched"
        assert loaded.SerializeToString() == proto_before
        with open(path, "rb") as f:
            assert f.read() == file_before
        assert sorted(os.listdir(tmp)) == ["model.onnx"]


@_settings(30)
@given(residual_nets())
def test_input_file_unchanged(gen):
    check_input_file_unchanged(gen)


@pytest.mark.slow
@_settings(300, slow=True)
@given(residual_nets())
def test_input_file_unchanged_slow(gen):
    check_input_file_unchanged(gen)


# ---------------------------------------------------------------------------------------------------------
# The generator covers what it claims
# ---------------------------------------------------------------------------------------------------------

REQUIRED_SHARES = ("side_inputs", "inner_outputs", "projection", "sum_merge")


def test_generator_feature_shares():
    """Over a fixed (derandomized) sample of 200 graphs, each feature appears in at least 10% of them."""
    sample: list[GenGraph] = []

    @settings(max_examples=200, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(residual_nets())
    def collect(gen):
        sample.append(gen)

    collect()
    n = len(sample)
    assert n >= 150
    keys = list(sample[0].features) + ["removable_block", "opset<13", "opset>=18", "tabular"]
    counts = {k: sum(g.features.get(k, False) for g in sample) for k in sample[0].features}
    counts["removable_block"] = sum(bool(g.removable) for g in sample)
    counts["opset<13"] = sum(g.opset < 13 for g in sample)
    counts["opset>=18"] = sum(g.opset >= 18 for g in sample)
    counts["tabular"] = sum(g.family == "tabular" for g in sample)
    shares = {k: counts[k] / n for k in keys}
    print(f"\ngraphgen feature shares over {n} graphs:")
    for k in keys:
        print(f"  {k:18s} {shares[k]:6.1%}")
    low = {k: shares[k] for k in REQUIRED_SHARES if shares[k] < 0.10}
    assert not low, low


# ---------------------------------------------------------------------------------------------------------
# Regression tests for bugs found by the fuzzer (plain graphs)
# ---------------------------------------------------------------------------------------------------------

def _tabular_two_blocks(y_shape, y2_shape, *, relu: bool = False, head: bool = False) -> onnx.ModelProto:
    """x[N,4] -> y = x + x@W1 (-> Relu z) -> y2 = y + y@W2 (-> logits = y2@W3); y (or z) and y2 (or logits)
    are graph outputs declared with the given shapes."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 4)).astype(np.float32), n) for n in ("W1", "W2", "W3")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"]), helper.make_node("Add", ["x", "h1"], ["y"])]
    first = "y"
    if relu:
        nodes.append(helper.make_node("Relu", ["y"], ["z"]))
        first = "z"
    nodes += [helper.make_node("MatMul", [first, "W2"], ["h2"]), helper.make_node("Add", [first, "h2"], ["y2"])]
    last = "y2"
    if head:
        nodes.append(helper.make_node("MatMul", ["y2", "W3"], ["logits"]))
        last = "logits"
    outs = [helper.make_tensor_value_info(first, TensorProto.FLOAT, y_shape),
            helper.make_tensor_value_info(last, TensorProto.FLOAT, y2_shape)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _assert_prunes_with_same_interface(model: onnx.ModelProto, n_blocks: int) -> None:
    report = find_blocks(model)
    assert len(report.blocks) == n_blocks, report
    for i in range(len(report.blocks)):
        pruned = remove_blocks(model, [report.blocks[i]])
        onnx.checker.check_model(pruned, full_check=True)
        assert interface(pruned) == interface(model)
        _run(pruned, {"x": np.ones((2, 4), np.float32)})


def test_declared_output_shapes_control():
    """Control for the regression tests below: with output shapes declared like the input's, all is well."""
    _assert_prunes_with_same_interface(_tabular_two_blocks(["N", 4], ["N", 4]), 2)
    _assert_prunes_with_same_interface(_tabular_two_blocks(["N", 4], ["N", 4], head=True), 2)


def test_output_declared_with_unknown_dims():
    # The head output `logits` is declared [?, ?]; removing either block must keep it that way.
    _assert_prunes_with_same_interface(_tabular_two_blocks(["N", 4], [None, None], head=True), 2)


def test_output_declared_with_unknown_batch_dim():
    _assert_prunes_with_same_interface(_tabular_two_blocks(["N", 4], [None, 4], head=True), 2)


def test_output_batch_dim_named_differently():
    # y = x + x@W1 is a graph output declared ['batch', 4] (x is ['N', 4]): both blocks are identity-skip,
    # shape-keeping blocks; the report says "shape change: entry ['N', 4] vs exit ['batch', 4]".
    _assert_prunes_with_same_interface(_tabular_two_blocks(["batch", 4], ["N", 4]), 2)


def test_post_merge_relu_output_batch_dim_named_differently():
    model = _tabular_two_blocks(["batch", 4], ["N", 4], relu=True)
    report = find_blocks(model)
    assert [b.exit for b in report.blocks] == ["z", "y2"], report


@settings(deadline=None, max_examples=100, derandomize=True, database=None, phases=(Phase.explicit, Phase.generate),
          suppress_health_check=[HealthCheck.too_slow])
@given(residual_nets(loose_outputs=True), st.data())
def test_loose_output_shapes(gen, data):
    check_detection(gen)
    check_prune_subset(gen, _subset_picker(data))


# ---------------------------------------------------------------------------------------------------------
# 6. Hostile files (issue 22): refused in one line, in bounded time, nothing written anywhere
# ---------------------------------------------------------------------------------------------------------

HOSTILE_GRAPH = sorted(hostile.GRAPH_CASES)
HOSTILE_EXTERNAL = sorted(hostile.EXTERNAL_CASES)
HOSTILE_DATA = ["pickled_npz", "compressed_bomb", "png_warned", "png_refused"]
HOSTILE_SECONDS = 30


def _tree(root: str) -> dict[str, tuple]:
    """Every entry under ``root``: (kind, size, mtime) of files, links and folders (links not followed)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(folder, name)
            st_ = os.lstat(p)
            out[os.path.relpath(p, root)] = (st_.st_mode, st_.st_size if not os.path.isdir(p) else 0, st_.st_mtime_ns)
    return out


def _hostile_files(tmp: str, kind: str, k: int, gen) -> tuple[str, str]:
    """Build the hostile case under ``tmp``: (model path, calibration path)."""
    from pathlib import Path

    root = Path(tmp)
    (root / "in").mkdir()
    (root / "out").mkdir()
    secret = root / "secret.bin"
    secret.write_bytes(b"secret" * 10**5)
    model_path = root / "in" / "model.onnx"
    calib = root / "calib.npy"
    if kind in HOSTILE_GRAPH:
        onnx.save(hostile.GRAPH_CASES[kind](_copy(gen.model), k), model_path)
    elif kind in HOSTILE_EXTERNAL:
        onnx.save_model(_copy(gen.model), model_path, save_as_external_data=True, location="model.data",
                        size_threshold=0)
        hostile.EXTERNAL_CASES[kind](model_path, secret, k)
    else:
        onnx.save(hostile.base_model(), model_path)
        calib = root / "calib"
        calib.mkdir()
        if kind == "pickled_npz":
            hostile.pickled_npz(calib / "a.npz", k)
        elif kind == "compressed_bomb":
            hostile.compressed_bomb(calib / "a.npz", (2 + k) * 2**20)
        else:
            side = 10_000 if kind == "png_warned" else 14_000 * k
            hostile.png_header(calib / "a.png", side, side)
    if not calib.exists():
        np.save(calib, np.zeros((8, hostile.WIDTH), np.float32))
    return str(model_path), str(calib)


def check_hostile(kind: str, k: int, gen) -> None:
    import contextlib
    import io
    import signal
    import time
    from unittest import mock

    from onnx_consensus.cli import main
    from onnx_consensus.data import formats

    def hang(*_):
        raise TimeoutError(f"{kind} (k={k}) ran over {HOSTILE_SECONDS} s")

    with tempfile.TemporaryDirectory() as tmp:
        model_path, calib = _hostile_files(tmp, kind, k, gen)
        before = _tree(tmp)
        out = os.path.join(tmp, "out")
        runs = [[model_path, os.path.join(out, "p.onnx"), "--calib", calib, "--remove", "1", "-q", "--no-latency",
                 "--report", os.path.join(out, "r.json")]]
        if kind not in HOSTILE_DATA:
            runs.append(["inspect", model_path])
        old = signal.signal(signal.SIGALRM, hang)
        try:
            for argv in runs:
                err = io.StringIO()
                signal.alarm(HOSTILE_SECONDS)
                t0 = time.perf_counter()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
                        mock.patch.object(formats, "memory_budget", lambda: 2 * 2**20, create=True):
                    code = main(argv)
                signal.alarm(0)
                msg = err.getvalue().strip()
                ctx = f"\n{kind} k={k} {argv[0]}: {msg}\n" + (gen.describe() if gen is not None else "")
                assert code == 2, f"exit {code}{ctx}"
                assert msg.startswith("onnx-cprune: error:") and len(msg.splitlines()) == 1, ctx
                assert time.perf_counter() - t0 < HOSTILE_SECONDS, ctx
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        assert _tree(tmp) == before, f"files changed: {set(_tree(tmp).items()) ^ set(before.items())}"
        assert os.listdir(out) == []


@st.composite
def hostile_cases(draw):
    kind = draw(st.sampled_from(HOSTILE_GRAPH + HOSTILE_EXTERNAL + HOSTILE_DATA), label="kind")
    k = draw(st.integers(1, 4), label="k")
    gen = draw(residual_nets(max_blocks=3)) if kind not in HOSTILE_DATA else None
    return kind, k, gen


@_settings(40)
@given(hostile_cases())
def test_hostile_files_refused(case):
    check_hostile(*case)


@pytest.mark.slow
@_settings(10_000, slow=True)
@given(hostile_cases())
def test_hostile_files_refused_slow(case):
    check_hostile(*case)
