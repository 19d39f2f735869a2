"""LSTM, GRU and RNN in the PyTorch bridge: parity with onnxruntime for every direction, optional input
and attribute; gradients reach W, R, B; write_back round trip; exports of torch.nn.LSTM / GRU; a small
captcha-OCR-like model (conv -> bidirectional LSTM -> per-step classes) that check_supported accepts and
that one distillation epoch fine-tunes. onnxruntime is the reference (layout 1, which onnxruntime refuses,
is checked against the layout-0 model's onnxruntime outputs transposed)."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from onnx_consensus.bridge import check_supported, to_torch, write_back
from onnx_consensus.errors import UnsupportedOperatorError
from onnx_consensus.finetune.train import finetune
from onnx_consensus.options import FinetuneConfig

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def rnn_model(op: str, *, direction: str = "forward", T: int = 5, N: int = 3, I: int = 4, H: int = 6,
              opset: int = 14, bias: bool = True, lens: bool = False, init_h: bool = False,
              init_c: bool = False, peep: bool = False, layout: int = 0, outputs=("Y", "Y_h", "Y_c"),
              seed: int = 0, **attrs) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One recurrent node with random initializer weights; returns (model, feeds).

    Graph inputs: X, and sequence_lens / initial_h / initial_c when asked for (fed with random values,
    lengths in 1..T with at least one short sample)."""
    rng = np.random.default_rng(seed)
    D = 2 if direction == "bidirectional" else 1
    G = GATES[op]
    inits = [numpy_helper.from_array((rng.standard_normal((D, G * H, I)) * 0.5).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((D, G * H, H)) * 0.5).astype(np.float32), "R")]
    node_in = ["X", "W", "R", "B" if bias else ""]
    if bias:
        b = (rng.standard_normal((D, 2 * G * H)) * 0.5).astype(np.float32)
        inits.append(numpy_helper.from_array(b, "B"))
    x_shape = (T, N, I) if layout == 0 else (N, T, I)
    s_shape = (D, N, H) if layout == 0 else (N, D, H)
    feeds = {"X": rng.standard_normal(x_shape).astype(np.float32)}
    g_in = [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))]
    if lens:
        feeds["lens"] = np.array([T] + [int(v) for v in rng.integers(1, T, N - 1)], np.int32)
        g_in.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [N]))
    node_in.append("lens" if lens else "")
    for name, want in (("h0", init_h), ("c0", init_c)):
        if name == "c0" and op != "LSTM":
            continue
        if want:
            feeds[name] = rng.standard_normal(s_shape).astype(np.float32)
            g_in.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(s_shape)))
        node_in.append(name if want else "")
    if peep:
        inits.append(numpy_helper.from_array((rng.standard_normal((D, 3 * H)) * 0.5).astype(np.float32), "P"))
        node_in.append("P")
    while node_in and not node_in[-1]:
        node_in.pop()
    outs = [o for o in outputs if op == "LSTM" or o != "Y_c"]
    if layout:
        attrs["layout"] = layout
    node = helper.make_node(op, node_in, outs, hidden_size=H, direction=direction, **attrs)
    y_shape = [T, D, N, H] if layout == 0 else [N, T, D, H]
    g_out = [helper.make_tensor_value_info(o, TensorProto.FLOAT, y_shape if k == 0 else list(s_shape))
             for k, o in enumerate(outs) if o]
    graph = helper.make_graph([node], "rnn", g_in, g_out, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, feeds


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def torch_run(module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*[torch.from_numpy(feeds[n]) for n in module.input_names])
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]


def assert_close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-5) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.abs(expected).max()), 1e-6)
    err = float(np.abs(actual - expected).max())
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} * {scale:.3g}"


def assert_parity(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    check_supported(model)
    expected = ort_run(model, feeds)
    actual = torch_run(to_torch(model).eval(), feeds)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_close(a, e)


# ---- parity with onnxruntime ----------------------------------------------------------------------

DIRECTIONS = ["forward", "reverse", "bidirectional"]

CONFIGS = {
    "plain": {},
    "no-bias": {"bias": False},
    "lens": {"lens": True},
    "init-state": {"init_h": True, "init_c": True},
    "lens+init": {"lens": True, "init_h": True, "init_c": True},
    "clip": {"clip": 0.4},
    "opset7": {"opset": 7},
    "opset22": {"opset": 22},
}


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_parity(op, config, direction):
    assert_parity(*rnn_model(op, direction=direction, **CONFIGS[config]))


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("lbr", [0, 1])
def test_gru_linear_before_reset(direction, lbr):
    assert_parity(*rnn_model("GRU", direction=direction, linear_before_reset=lbr, lens=True, init_h=True))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_lstm_peepholes_and_input_forget(direction):
    assert_parity(*rnn_model("LSTM", direction=direction, peep=True, lens=True, init_c=True))
    assert_parity(*rnn_model("LSTM", direction=direction, input_forget=1, seed=1))
    assert_parity(*rnn_model("LSTM", direction=direction, peep=True, input_forget=1, clip=0.7, seed=2))


@pytest.mark.parametrize("op,acts,alpha,beta", [
    ("RNN", ["Relu"], None, None),
    ("RNN", ["Affine"], [0.7], [0.2]),
    ("RNN", ["ScaledTanh", "LeakyRelu"], [0.8, 0.3], [1.5]),
    ("GRU", ["HardSigmoid", "Softsign"], [0.3], [0.4]),
    ("GRU", ["Sigmoid", "Elu", "HardSigmoid", "Softplus"], [0.9, 0.25], [0.55]),
    ("LSTM", ["HardSigmoid", "ThresholdedRelu", "Tanh"], [0.25, 0.1], [0.6]),
])
def test_non_default_activations(op, acts, alpha, beta):
    direction = "bidirectional" if len(acts) == 2 * {"RNN": 1, "GRU": 2, "LSTM": 3}[op] else "forward"
    attrs = {"activations": acts}
    if alpha:
        attrs["activation_alpha"] = alpha
    if beta:
        attrs["activation_beta"] = beta
    assert_parity(*rnn_model(op, direction=direction, **attrs))


@pytest.mark.parametrize("outputs", [("Y",), ("", "Y_h"), ("", "", "Y_c"), ("Y", "", "Y_c")])
def test_output_subsets(outputs):
    assert_parity(*rnn_model("LSTM", direction="bidirectional", lens=True, outputs=outputs))


@pytest.mark.parametrize("lens", [True, False])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_layout_1_is_layout_0_transposed(op, direction, lens):
    """onnxruntime refuses layout 1: the reference is the layout-0 node on transposed data (with
    random lengths the step loop runs, without them torch's fused kernel)."""
    kw = dict(direction=direction, lens=lens, init_h=True, init_c=True, seed=3,
              linear_before_reset=1 if op == "GRU" else None)
    kw = {k: v for k, v in kw.items() if v is not None}
    m0, f0 = rnn_model(op, **kw)
    m1, _ = rnn_model(op, layout=1, **kw)
    f1 = {k: (v.swapaxes(0, 1) if v.ndim == 3 else v) for k, v in f0.items()}
    expected = ort_run(m0, f0)
    actual = torch_run(to_torch(m1).eval(), f1)
    assert_close(actual[0], expected[0].transpose(2, 0, 1, 3))
    for a, e in zip(actual[1:], expected[1:]):
        assert_close(a, e.swapaxes(0, 1))


def test_unsupported_configurations_are_named():
    bad, _ = rnn_model("LSTM", activations=["Sigmoid", "Gelu", "Tanh"])
    with pytest.raises(UnsupportedOperatorError, match="LSTM.*Gelu"):
        check_supported(bad)
    bad, _ = rnn_model("GRU", direction="bidirectional", activations=["Sigmoid", "Tanh"])
    with pytest.raises(UnsupportedOperatorError, match="GRU.*2 activations.*expected 4"):
        check_supported(bad)
    bad, _ = rnn_model("RNN", direction="sideways")
    with pytest.raises(UnsupportedOperatorError, match="RNN.*direction 'sideways'"):
        check_supported(bad)
    bad, _ = rnn_model("LSTM", opset=6)
    with pytest.raises(UnsupportedOperatorError, match="LSTM .*opset 6"):
        check_supported(bad)


@pytest.mark.parametrize("op,kw", [
    ("LSTM", {"direction": "bidirectional", "init_h": True, "init_c": True}),
    ("LSTM", {"direction": "reverse", "layout": 1}),
    ("GRU", {"direction": "bidirectional", "linear_before_reset": 1, "init_h": True}),
    ("GRU", {"direction": "reverse", "linear_before_reset": 1, "lens": "full"}),
    ("RNN", {"direction": "bidirectional", "activations": ["Relu", "Relu"]}),
    ("RNN", {"direction": "reverse", "bias": False}),
])
def test_fused_kernels_equal_the_step_loop(op, kw, monkeypatch):
    """Where torch's fused kernel runs, it gives the step loop's outputs and gradients."""
    from onnx_consensus.bridge import ops_rnn

    full = kw.pop("lens", None) == "full"
    model, feeds = rnn_model(op, lens=full, **kw)
    if full:
        feeds["lens"][:] = 5
    results = []
    for fused in (True, False):
        monkeypatch.setattr(ops_rnn, "FUSED", fused)
        module = to_torch(model).train()
        calls = []
        if fused:
            for name in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
                real = getattr(torch, name)
                monkeypatch.setattr(torch, name, lambda *a, _r=real, **k: calls.append(1) or _r(*a, **k))
        outs = module(*[torch.from_numpy(feeds[n]) for n in module.input_names])
        monkeypatch.undo()
        assert bool(calls) == fused
        w = [torch.from_numpy(np.random.default_rng(k).standard_normal(o.shape).astype(np.float32))
             for k, o in enumerate(outs)]
        sum((o * wk).sum() for o, wk in zip(outs, w)).backward()
        results.append(([o.detach() for o in outs], {n: p.grad for n, p in module.weights.items()}))
    (o1, g1), (o2, g2) = results
    for a, b in zip(o1, o2):
        assert_close(a.numpy(), b.numpy())
    assert g1.keys() == g2.keys() and {"W", "R"} <= set(g1)
    for k in g1:
        assert_close(g1[k].numpy(), g2[k].numpy(), 1e-4)


# ---- training and write-back ----------------------------------------------------------------------

@pytest.mark.parametrize("op,kw", [
    ("LSTM", {"direction": "bidirectional", "peep": True, "lens": True}),
    ("GRU", {"direction": "bidirectional", "linear_before_reset": 1}),
    ("GRU", {"direction": "reverse", "lens": True}),
    ("RNN", {"direction": "forward"}),
])
def test_training_step_reaches_weights_and_writes_back(op, kw):
    model, feeds = rnn_model(op, **kw)
    module = to_torch(model).train()
    learned = set(module.trainable_names)
    assert {"W", "R", "B"} <= learned and ("P" in learned) == bool(kw.get("peep"))
    target = torch.from_numpy(np.random.default_rng(1).standard_normal(ort_run(model, feeds)[0].shape)
                              .astype(np.float32))
    inputs = [torch.from_numpy(feeds[n]) for n in module.input_names]
    before = {n: t.detach().clone() for n, t in module.onnx_state().items()}
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        out = module(*inputs)
        y = out[0] if isinstance(out, tuple) else out
        loss = torch.nn.functional.mse_loss(y, target)
        opt.zero_grad()
        loss.backward()
        grads = {n: module.weights[module.onnx_to_key[n]].grad for n in learned}
        assert all(g is not None and torch.any(g != 0) for g in grads.values()), \
            [n for n, g in grads.items() if g is None or not torch.any(g != 0)]
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    after = module.onnx_state()
    assert all(not torch.equal(before[n], after[n]) for n in learned)
    written = write_back(module.eval(), model)
    onnx.checker.check_model(written, full_check=True)
    assert [n.input for n in written.graph.node] == [n.input for n in model.graph.node]
    for a, e in zip(torch_run(module, feeds), ort_run(written, feeds)):
        assert_close(a, e)
    assert not np.allclose(ort_run(written, feeds)[0], ort_run(model, feeds)[0])


# ---- torch.nn exports (classic exporter) ----------------------------------------------------------

class _Seq2Seq(nn.Module):
    """x (N, T, 5) -> (N, T, 2*7) through a 2-layer bidirectional recurrent layer, batch_first."""

    def __init__(self, kind: str):
        super().__init__()
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
        self.rnn = cls(5, 7, num_layers=2, bidirectional=True, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


def _export(net: nn.Module, x: torch.Tensor, path, opset: int = 17) -> onnx.ModelProto:
    warnings.filterwarnings("ignore")
    with torch.no_grad():
        torch.onnx.export(net.eval(), (x,), str(path), dynamo=False, opset_version=opset,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch", 1: "time"}, "y": {0: "batch", 1: "time"}})
    return onnx.load(str(path))


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_torch_export_matches_torch_and_onnxruntime(kind, tmp_path):
    torch.manual_seed(0)
    net = _Seq2Seq(kind)
    model = _export(net, torch.randn(2, 6, 5), tmp_path / f"{kind}.onnx")
    assert {n.op_type for n in model.graph.node} & {"LSTM", "GRU", "RNN"}
    module = to_torch(model).eval()
    for n, t in ((3, 9), (1, 4)):  # other batch and sequence lengths than the export's
        x = np.random.default_rng(n).standard_normal((n, t, 5)).astype(np.float32)
        (expected,) = ort_run(model, {"x": x})
        (actual,) = torch_run(module, {"x": x})
        assert_close(actual, expected)
        with torch.no_grad():
            assert_close(actual, net(torch.from_numpy(x)).numpy())


# ---- a captcha-OCR-like model: conv features -> bidirectional LSTM -> per-time-step classes ---------

class TinyOCR(nn.Module):
    """(N, 1, 16, 32) grey image -> (N, 8, 11) per-time-step class scores (one step per 4 columns)."""

    def __init__(self, classes: int = 11):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(2),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.lstm = nn.LSTM(16 * 4, 24, bidirectional=True)
        self.head = nn.Linear(48, classes)

    def forward(self, x):
        f = self.conv(x)  # (N, 16, 4, 8)
        f = f.permute(3, 0, 1, 2).flatten(2)  # (T=8, N, 64)
        y, _ = self.lstm(f)
        return self.head(y).permute(1, 0, 2)  # (N, T, classes)


def _ocr_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images of 8 "digits": column band k of 4 pixels holds a pattern chosen by its label, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 11, (n, 8))
    patterns = rng.standard_normal((11, 16, 4)).astype(np.float32)
    x = np.concatenate([patterns[labels[:, k]] for k in range(8)], axis=2)[:, None]
    return (x + 0.3 * rng.standard_normal(x.shape)).astype(np.float32), labels


@pytest.fixture(scope="module")
def ocr(tmp_path_factory):
    torch.manual_seed(0)
    net = TinyOCR()
    x, y = _ocr_data(256, 0)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(3):  # a little training so the model is not random
        for i in range(0, len(x), 64):
            out = net(torch.from_numpy(x[i:i + 64]))
            target = torch.from_numpy(y[i:i + 64]).reshape(-1)
            loss = torch.nn.functional.cross_entropy(out.reshape(-1, 11), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    path = tmp_path_factory.mktemp("ocr") / "ocr.onnx"
    warnings.filterwarnings("ignore")
    with torch.no_grad():
        torch.onnx.export(net.eval(), (torch.from_numpy(x[:2]),), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load(str(path)), x, y


def test_ocr_model_is_supported_and_matches_onnxruntime(ocr):
    model, x, _ = ocr
    assert "LSTM" in {n.op_type for n in model.graph.node}
    check_supported(model)
    (expected,) = ort_run(model, {"image": x[:5]})
    (actual,) = torch_run(to_torch(model).eval(), {"image": x[:5]})
    assert_close(actual, expected)


def test_ocr_model_distillation_epoch(ocr):
    model, x, y = ocr
    student = onnx.ModelProto()
    student.CopyFrom(model)
    rng = np.random.default_rng(0)
    lstm = next(n for n in student.graph.node if n.op_type == "LSTM")
    recurrent = set(lstm.input[1:4])
    for t in student.graph.initializer:  # damage the LSTM weights: distillation must repair them
        if t.name in recurrent:
            a = numpy_helper.to_array(t)
            t.CopyFrom(numpy_helper.from_array((a + rng.normal(0, 0.3, a.shape)).astype(np.float32), t.name))
    (t_logits,) = ort_run(model, {"image": x})

    def agreement(m):
        (s_logits,) = ort_run(m, {"image": x})
        return float((s_logits.argmax(-1) == t_logits.argmax(-1)).mean())

    before = agreement(student)
    batches = lambda: [({"image": x[i:i + 32]}, None) for i in range(0, len(x), 32)]  # noqa: E731
    cfg = FinetuneConfig(epochs=1, lr=0.01, optimizer="adamw")
    tuned, res = finetune(student, batches, teacher=model, config=cfg, eval_fn=agreement, progress=False)
    assert res.mode == "distillation" and res.history[-1]["epoch"] == 1 and res.images_seen == len(x)
    onnx.checker.check_model(tuned, full_check=True)
    assert [n.op_type for n in tuned.graph.node] == [n.op_type for n in student.graph.node]
    changed = {t.name for t, s in zip(tuned.graph.initializer, student.graph.initializer)
               if not np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(s))}
    assert recurrent <= changed
    assert res.best_metric == pytest.approx(agreement(tuned)) and res.best_metric > before
