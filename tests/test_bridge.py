"""The PyTorch bridge: parity with onnxruntime, gradients, BN training semantics, write-back, the weight
rule, unsupported operators, and fine-tuning. onnxruntime is the independent reference throughout."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_consensus.finetune.train import FinetuneResult, finetune
from onnx_consensus.options import FinetuneConfig
from onnx_consensus.bridge import (OnnxModule, check_supported,
                                   to_torch, write_back)
from onnx_consensus.errors import FinetuneError, UnsupportedOperatorError
from tests.bridge_models import (DigitsNet, digits_data, export_case, old_inputs, old_opset8_model,
                                 old_opset11_model)



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """2 shared, busy cores: extra torch threads only spin-wait. Restored after this module."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# name -> sequence lengths to test (None: not a token model). The classic exporter bakes the sequence
# length inside nn.MultiheadAttention (a torch limitation), so that encoder export runs at its export
# length; its dynamo export covers two sequence lengths.
CASES = {
    "resnet20-folded": [None], "resnet20-bn": [None], "resnet20-dynamo": [None],
    "mobilenet-bn": [None], "mobilenet-folded": [None],
    "vit-classic": [None], "vit-dynamo": [None],
    "encoder-classic": [12], "encoder-dynamo": [7, 12],
    "decoder-classic": [5, 12], "decoder-dynamo": [6, 11],
    "old11": [None], "old8": [None],
}


@pytest.fixture(scope="module")
def models():
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            if name == "old11":
                cache[name] = (old_opset11_model(), old_inputs((8, 8, 3)))
            elif name == "old8":
                cache[name] = (old_opset8_model(), old_inputs((3, 6, 6)))
            else:
                cache[name] = export_case(name)
        return cache[name]

    return get


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def torch_run(module: OnnxModule, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*[torch.from_numpy(feeds[n]) for n in module.input_names])
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]


def assert_close_rel(actual: np.ndarray, expected: np.ndarray, rel: float) -> None:
    assert actual.shape == expected.shape
    scale = max(float(np.abs(expected).max()), 1e-6)
    err = float(np.abs(actual - expected).max())
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} * {scale:.3g}"


def independent_learned(model: onnx.ModelProto) -> set[str]:
    """The weight rule applied to the graph directly: float initializers / Constant values with more
    than one element and only finite values, minus BatchNormalization running mean and variance."""
    bn_stats = {n.input[i] for n in model.graph.node if n.op_type == "BatchNormalization" for i in (3, 4)}
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    values[n.output[0]] = numpy_helper.to_array(a.t)
                elif a.name == "value_floats":
                    values[n.output[0]] = np.asarray(a.floats, np.float32)
    return {k for k, v in values.items()
            if v.dtype.kind == "f" and v.size > 1 and np.isfinite(v).all() and k not in bn_stats}


# ---- parity ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_onnxruntime(models, name):
    model, make = models(name)
    module = to_torch(model).eval()
    for batch in (2, 5):
        for seq in CASES[name]:
            feeds = make(batch, seq)
            expected = ort_run(model, feeds)
            actual = torch_run(module, feeds)
            assert len(actual) == len(expected)
            for a, e in zip(actual, expected):
                assert_close_rel(a, e, 1e-4)


def test_forward_named_returns_inner_tensor(models):
    model, make = models("resnet20-bn")
    module = to_torch(model).eval()
    gap = next(n.output[0] for n in model.graph.node if n.op_type == "GlobalAveragePool")
    feeds = make(3)
    m2 = onnx.ModelProto()
    m2.CopyFrom(model)
    m2.graph.output.append(helper.make_empty_tensor_value_info(gap))
    exp_logits, exp_feat = ort_run(m2, feeds)
    with torch.no_grad():
        out = module.forward_named({"input": torch.from_numpy(feeds["input"])}, ["logits", gap])
    assert_close_rel(out[gap].numpy(), exp_feat, 1e-4)
    assert_close_rel(out["logits"].numpy(), exp_logits, 1e-4)


# ---- gradients and BN training semantics ----------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet20-bn", "mobilenet-bn", "vit-classic", "encoder-dynamo",
                                  "decoder-classic", "old11"])
def test_every_parameter_gets_a_gradient(models, name):
    model, make = models(name)
    module = to_torch(model).train()
    feeds = make(4, CASES[name][-1])
    out = module(*[torch.from_numpy(feeds[n]) for n in module.input_names])
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * w).sum().backward()
    params = dict(module.weights.items())
    assert params
    missing = [k for k, p in params.items() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"parameters without gradient: {missing}"


def _bn_model(momentum: float, eps: float, c: int = 3) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "scale"),
             numpy_helper.from_array(rng.uniform(-0.5, 0.5, c).astype(np.float32), "bias"),
             numpy_helper.from_array(rng.uniform(-0.5, 0.5, c).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2.0, c).astype(np.float32), "var")]
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"],
                            epsilon=eps, momentum=momentum)
    g = helper.make_graph([node], "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 5, 5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])


def test_batchnorm_train_mode_matches_torch():
    model = _bn_model(momentum=0.7, eps=1e-3)
    module = to_torch(model).train()
    ref = torch.nn.BatchNorm2d(3, eps=1e-3, momentum=0.3)
    with torch.no_grad():
        for attr, name in [("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
                           ("running_var", "var")]:
            getattr(ref, attr).copy_(torch.tensor(numpy_helper.to_array(
                next(t for t in model.graph.initializer if t.name == name))))
    ref.train()
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    w = torch.randn(4, 3, 5, 5)
    opt_a = torch.optim.SGD(module.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(ref.parameters(), lr=0.1)
    ya, yb = module(x), ref(x)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    opt_a.step(), opt_b.step()
    state = module.onnx_state()
    torch.testing.assert_close(state["mean"], ref.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state["var"], ref.running_var, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state["scale"].detach(), ref.weight.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state["bias"].detach(), ref.bias.detach(), rtol=1e-6, atol=1e-6)
    # eval mode uses the stored (updated) statistics, and write_back stores them in the graph
    module.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), ref(x), rtol=1e-5, atol=1e-5)
    written = write_back(module, model)
    (y_ort,) = ort_run(written, {"x": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y_ort, ref(x).numpy(), rtol=1e-5, atol=1e-5)


# ---- write-back -----------------------------------------------------------------------------------

def _without_initializers(model: onnx.ModelProto, constants: bool = False) -> bytes:
    """The serialized model minus initializer data (and, if ``constants``, minus Constant-node data)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.initializer[:]
    if constants:
        for n in m.graph.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    a.t.ClearField("raw_data")
                    a.t.ClearField("float_data")
    return m.SerializeToString()


@pytest.mark.parametrize("name", ["resnet20-bn", "vit-classic", "old11"])
def test_roundtrip_without_training_is_identity(models, name):
    model, make = models(name)
    module = to_torch(model)
    written = write_back(module, model)
    assert _without_initializers(written) == _without_initializers(model)
    for a, b in zip(written.graph.initializer, model.graph.initializer):
        assert a.name == b.name and np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    feeds = make(3, CASES[name][-1])
    for a, e in zip(ort_run(written, feeds), ort_run(model, feeds)):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["resnet20-bn", "old11", "vit-dynamo"])
def test_write_back_after_sgd_steps(models, name):
    model, make = models(name)
    module = to_torch(model).train()
    opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        feeds = make(4 + step, CASES[name][-1])
        out = module(*[torch.from_numpy(feeds[n]) for n in module.input_names])
        loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(step))).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
    written = write_back(module, model)
    onnx.checker.check_model(written, full_check=True)
    assert _without_initializers(written, True) == _without_initializers(model, True)
    changed = [t.name for t, o in zip(written.graph.initializer, model.graph.initializer)
               if not np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(o))]
    assert changed
    if name == "resnet20-bn":  # running statistics were updated and written
        bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
        assert bn.input[3] in changed and bn.input[4] in changed
    if name == "old11":  # Constant-node weights were updated and written
        w_new = next(n for n in written.graph.node if n.output[0] == "conv_w").attribute[0].t
        w_old = next(n for n in model.graph.node if n.output[0] == "conv_w").attribute[0].t
        assert not np.array_equal(numpy_helper.to_array(w_new), numpy_helper.to_array(w_old))
    feeds = make(3, CASES[name][-1])
    for a, e in zip(torch_run(module, feeds), ort_run(written, feeds)):
        assert_close_rel(a, e, 1e-4)


# ---- the weight rule ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet20-bn", "resnet20-folded", "vit-classic", "encoder-classic",
                                  "decoder-classic", "old11"])
def test_trainable_tensors_follow_the_weight_rule(models, name):
    model, _ = models(name)
    module = to_torch(model)
    expected = independent_learned(model)
    assert set(module.trainable_names) == expected
    assert len(list(module.parameters())) == len(expected)
    assert sum(p.numel() for p in module.parameters()) == sum(
        int(np.prod(module.onnx_state()[n].shape)) for n in expected)
    # ResNet-20: 21 conv weights + 21 BN scale/shift pairs + fc weight/bias; folded: 21 conv w+b + fc
    if name == "resnet20-bn":
        assert len(expected) == 21 + 42 + 2
    if name == "resnet20-folded":
        assert len(expected) == 42 + 2


# ---- unsupported operators ------------------------------------------------------------------------

def test_unsupported_operators_are_all_named():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("FancyOp", ["x"], ["a"], domain="my.ops"),
             helper.make_node("Hardmax", ["a"], ["b"]),
             helper.make_node("Relu", ["b"], ["c"]),
             helper.make_node("OtherOp", ["c"], ["y"], domain="my.ops")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("my.ops", 2)])
    with pytest.raises(UnsupportedOperatorError) as info:
        check_supported(model)
    msg = str(info.value)
    for part in ("FancyOp", "OtherOp", "'my.ops'", "opset 2", "Hardmax", "opset 13"):
        assert part in msg
    assert "Relu" not in msg
    with pytest.raises(UnsupportedOperatorError):
        to_torch(model)
    with pytest.raises(FinetuneError):  # UnsupportedOperatorError is a FinetuneError (exit 4)
        finetune(model, lambda: [], config=FinetuneConfig(), progress=False)


def test_registry_uses_opset_ranges():
    """An operator revision newer than any converter was written for still resolves (range, not exact
    since_version); an operator used below its first opset does not."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    s = numpy_helper.from_array(np.ones(4, np.float32), "s")
    rms = helper.make_node("RMSNormalization", ["x", "s"], ["y"])
    g = helper.make_graph([rms], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [s])
    check_supported(helper.make_model(g, opset_imports=[helper.make_opsetid("", 24)]))
    with pytest.raises(UnsupportedOperatorError, match="RMSNormalization"):
        check_supported(helper.make_model(g, opset_imports=[helper.make_opsetid("", 22)]))


# ---- fine-tuning ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from models.cifar_resnet import export_onnx

    out = tmp_path_factory.mktemp("digits")
    x, y = digits_data()
    torch.manual_seed(0)
    teacher = DigitsNet()
    opt = torch.optim.Adam(teacher.parameters(), lr=0.01)
    for _ in range(6):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128].numpy()
            loss = torch.nn.functional.cross_entropy(teacher(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    shape = (1, 1, 8, 8)
    export_onnx(teacher, str(out / "teacher.onnx"), fold_bn=False, input_shape=shape)
    torch.manual_seed(1)
    export_onnx(DigitsNet(), str(out / "scratch.onnx"), fold_bn=False, input_shape=shape)
    return onnx.load(str(out / "teacher.onnx")), onnx.load(str(out / "scratch.onnx")), x, y


def _batches(x, y, labels: bool, bs: int = 64):
    def make():
        return [({"input": x[i:i + bs]}, y[i:i + bs] if labels else None) for i in range(0, len(x), bs)]

    return make


def _accuracy(model, x, y) -> float:
    (logits,) = ort_run(model, {"input": x})
    return float((logits.argmax(1) == y).mean())


def test_finetune_supervised_reduces_loss(digits):
    _, scratch, x, y = digits
    acc0 = _accuracy(scratch, x, y)
    model, res = finetune(scratch, _batches(x, y, True), config=FinetuneConfig(epochs=2, lr=0.05),
                          eval_fn=lambda m: _accuracy(m, x, y), progress=False)
    assert isinstance(res, FinetuneResult) and res.mode == "supervised"
    assert len(res.history) == 2 and res.images_seen == 2 * len(x)
    assert res.history[1]["loss"] < res.history[0]["loss"]
    assert res.best_metric == max(h["metric"] for h in res.history) > acc0 + 0.2
    assert _accuracy(model, x, y) == pytest.approx(res.best_metric)
    # the untrained export shares BN running stats with BN weights (deduplicated, via Identity): the
    # trained statistics get their own initializers, only those BN inputs are renamed
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == [n.op_type for n in scratch.graph.node]
    renamed = {b for n, o in zip(model.graph.node, scratch.graph.node) for a, b in zip(n.input, o.input)
               if a != b}
    assert renamed and all(n.endswith(("running_mean", "running_var")) for n in renamed)


def test_finetune_distillation_reduces_loss(digits):
    teacher, _, x, _ = digits
    rng = np.random.default_rng(0)
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    for t in student.graph.initializer:  # damage the conv weights
        a = numpy_helper.to_array(t)
        if a.ndim == 4:
            t.CopyFrom(numpy_helper.from_array((a + rng.normal(0, 0.3, a.shape)).astype(np.float32), t.name))
    (t_logits,) = ort_run(teacher, {"input": x})

    def agreement(m):
        (s_logits,) = ort_run(m, {"input": x})
        return float((s_logits.argmax(1) == t_logits.argmax(1)).mean())

    feature = next(n.output[0] for n in teacher.graph.node if n.op_type == "GlobalAveragePool")
    before = agreement(student)
    cfg = FinetuneConfig(epochs=2, lr=0.02, feature_mse=1.0, feature=feature, augment=False)
    model, res = finetune(student, _batches(x, None, False), teacher=teacher, config=cfg, eval_fn=agreement,
                          progress=False)
    assert res.mode == "distillation"
    assert res.history[1]["loss"] < res.history[0]["loss"]
    assert res.best_metric > before


def test_finetune_returns_best_epoch_weights(digits):
    _, scratch, x, y = digits
    metrics = iter([0.3, 0.9, 0.5])
    seen: list[onnx.ModelProto] = []

    def eval_fn(m):
        seen.append(m)
        return next(metrics)

    model, res = finetune(scratch, _batches(x[:256], y[:256], True),
                          config=FinetuneConfig(epochs=3, lr=0.05, augment=True), eval_fn=eval_fn,
                          progress=False)
    assert res.best_epoch == 2 and res.best_metric == 0.9 and len(seen) == 3
    for a, b, c in zip(model.graph.initializer, seen[1].graph.initializer, seen[2].graph.initializer):
        assert np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    assert any(not np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(c))
               for a, c in zip(model.graph.initializer, seen[2].graph.initializer))


def test_finetune_failure_is_a_finetune_error(digits):
    _, scratch, x, y = digits
    bad = np.full_like(y, 99)  # labels out of range for 10 classes: cross-entropy fails
    with pytest.raises(FinetuneError) as info:
        finetune(scratch, _batches(x[:128], bad[:128], True), config=FinetuneConfig(), progress=False)
    assert "\n" not in str(info.value) and "fine-tuning failed" in str(info.value)
    with pytest.raises(FinetuneError, match="teacher"):
        finetune(scratch, _batches(x[:128], None, False), config=FinetuneConfig(), progress=False)


# ---- single operators against onnxruntime ---------------------------------------------------------

_R = np.random.default_rng(0)


def _f(*shape):
    return _R.standard_normal(shape).astype(np.float32)


def _i(*vals):
    return np.array(vals, np.int64)


# (id, op, opset, inputs, attributes, number of outputs). Inputs: None = omitted optional input; the
# first input, float arrays of rank >= 2 and booleans are graph inputs, the rest initializers (so both
# the constant and the run-time paths of the converters are exercised).
OPS = [
    ("conv-asym-group-dil", "Conv", 11, [_f(2, 4, 9, 9), _f(6, 2, 3, 3), _f(6)],
     dict(pads=[1, 0, 2, 1], group=2, dilations=[1, 2], strides=[2, 1]), 1),
    ("conv-same-upper", "Conv", 11, [_f(1, 2, 7, 8), _f(3, 2, 3, 3)], dict(auto_pad="SAME_UPPER", strides=[2, 2]), 1),
    ("conv-1d", "Conv", 11, [_f(2, 3, 10), _f(4, 3, 3)], dict(pads=[1, 1]), 1),
    ("convT-outpad", "ConvTranspose", 11, [_f(1, 4, 5, 5), _f(4, 3, 3, 3), _f(3)],
     dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]), 1),
    ("convT-asym", "ConvTranspose", 11, [_f(1, 4, 5, 5), _f(4, 3, 3, 3), _f(3)], dict(strides=[2, 2], pads=[0, 1, 1, 0]), 1),
    ("convT-group-outshape", "ConvTranspose", 11, [_f(1, 4, 4, 4), _f(4, 1, 3, 3)],
     dict(strides=[2, 2], group=2, output_shape=[8, 8]), 1),
    ("instnorm", "InstanceNormalization", 11, [_f(2, 3, 4, 5), _f(3), _f(3)], dict(epsilon=1e-4), 1),
    ("layernorm-axis", "LayerNormalization", 17, [_f(2, 3, 4, 5), _f(4, 5), _f(4, 5)], dict(axis=-2), 1),
    ("layernorm-bcast", "LayerNormalization", 17, [_f(2, 3, 4), _f(1, 4)], {}, 1),
    ("rmsnorm", "RMSNormalization", 23, [_f(2, 3, 8), _f(8)], dict(epsilon=1e-5), 1),
    ("gemm-transA-alpha", "Gemm", 13, [_f(4, 3), _f(4, 5), _f(5)], dict(transA=1, alpha=0.5, beta=2.0), 1),
    ("matmul-batched", "MatMul", 13, [_f(2, 3, 4), _f(4, 5)], {}, 1),
    ("einsum", "Einsum", 12, [_f(2, 3, 4), _f(2, 4, 5)], dict(equation="bij, bjk -> bik"), 1),
    ("leakyrelu", "LeakyRelu", 16, [_f(3, 4)], dict(alpha=0.2), 1),
    ("prelu", "PRelu", 16, [_f(2, 3, 4, 4), _f(3, 1, 1)], {}, 1),
    ("elu", "Elu", 6, [_f(3, 4)], dict(alpha=0.7), 1),
    ("selu", "Selu", 6, [_f(3, 4)], {}, 1),
    ("hardsigmoid", "HardSigmoid", 6, [_f(3, 4) * 4], dict(alpha=0.3, beta=0.4), 1),
    ("hardswish", "HardSwish", 14, [_f(3, 4) * 4], {}, 1),
    ("gelu-tanh", "Gelu", 20, [_f(3, 4)], dict(approximate="tanh"), 1),
    ("softplus", "Softplus", 1, [_f(3, 4)], {}, 1),
    ("clip-max-only", "Clip", 13, [_f(3, 4), None, np.array(0.5, np.float32)], {}, 1),
    ("softmax-13-axis1", "Softmax", 13, [_f(2, 3, 4)], dict(axis=1), 1),
    ("logsoftmax-11-axis1", "LogSoftmax", 11, [_f(2, 3, 4)], dict(axis=1), 1),
    ("maxpool-ceil-pads", "MaxPool", 12, [_f(1, 2, 7, 7)], dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1), 1),
    ("maxpool-indices", "MaxPool", 12, [_f(2, 3, 6, 6)], dict(kernel_shape=[2, 2], strides=[2, 2]), 2),
    ("maxpool-asym", "MaxPool", 12, [_f(1, 2, 6, 6)], dict(kernel_shape=[3, 3], pads=[0, 1, 2, 0]), 1),
    ("avgpool-incl-pad", "AveragePool", 11, [_f(1, 2, 6, 6)], dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1), 1),
    ("avgpool-excl-pad", "AveragePool", 11, [_f(1, 2, 6, 6)], dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]), 1),
    ("globalmaxpool", "GlobalMaxPool", 1, [_f(2, 3, 4, 5)], {}, 1),
    ("pad-edge", "Pad", 13, [_f(1, 2, 4, 4), _i(0, 0, 1, 2, 0, 0, 2, 1)], dict(mode="edge"), 1),
    ("pad-const-neg", "Pad", 13, [_f(2, 3, 4), _i(0, 1, -1, 1, 0, 2), np.array(1.5, np.float32)], {}, 1),
    ("pad-reflect-axes", "Pad", 18, [_f(1, 2, 5, 5), _i(2, 1, 1, 2), None, _i(2, 3)], dict(mode="reflect"), 1),
    ("pad-wrap", "Pad", 19, [_f(1, 2, 4, 4), _i(0, 0, 1, 2, 0, 0, 2, 1)], dict(mode="wrap"), 1),
    ("resize-nearest-asym", "Resize", 13, [_f(1, 2, 3, 4), None, np.array([1, 1, 2, 2], np.float32)],
     dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"), 1),
    ("resize-nearest-halfpixel", "Resize", 13, [_f(1, 2, 3, 4), None, None, _i(1, 2, 7, 5)],
     dict(mode="nearest", nearest_mode="round_prefer_ceil"), 1),
    ("resize-linear-align", "Resize", 13, [_f(1, 2, 3, 4), None, None, _i(1, 2, 6, 9)],
     dict(mode="linear", coordinate_transformation_mode="align_corners"), 1),
    ("resize-linear-asym", "Resize", 13, [_f(1, 2, 3, 4), None, np.array([1, 1, 2.5, 1.5], np.float32)],
     dict(mode="linear", coordinate_transformation_mode="asymmetric"), 1),
    ("resize-linear-down", "Resize", 13, [_f(1, 2, 8, 8), None, None, _i(1, 2, 3, 5)],
     dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"), 1),
    ("upsample-9", "Upsample", 9, [_f(1, 2, 3, 3), np.array([1, 1, 2, 3], np.float32)], dict(mode="nearest"), 1),
    ("reshape-zero", "Reshape", 14, [_f(2, 3, 4), _i(0, -1, 2)], {}, 1),
    ("flatten-2", "Flatten", 13, [_f(2, 3, 4, 5)], dict(axis=2), 1),
    ("transpose-default", "Transpose", 13, [_f(2, 3, 4)], {}, 1),
    ("squeeze-all", "Squeeze", 13, [_f(1, 3, 1, 4)], {}, 1),
    ("unsqueeze-neg", "Unsqueeze", 13, [_f(3, 4), _i(-1, 0)], {}, 1),
    ("concat-neg", "Concat", 13, [_f(2, 3), _f(2, 5)], dict(axis=-1), 1),
    ("split-num-outputs", "Split", 18, [_f(2, 7)], dict(axis=1, num_outputs=3), 3),
    ("split-input", "Split", 13, [_f(6, 2), _i(1, 5)], {}, 2),
    ("slice-neg-steps", "Slice", 13, [_f(5, 6, 7), _i(-1, 5, 1), _i(-100, 0, 100), _i(0, 2, 1), _i(-2, -1, 3)], {}, 1),
    ("gather-neg-2d", "Gather", 13, [_f(3, 5, 2), np.array([[0, -1], [2, 1]], np.int64)], dict(axis=1), 1),
    ("gather-scalar", "Gather", 13, [_f(3, 5), np.array(-2, np.int64)], dict(axis=0), 1),
    ("gatherelements", "GatherElements", 13, [_f(3, 4), np.array([[0, -1, 2], [1, 1, 0], [3, 2, 1]], np.int64)], dict(axis=1), 1),
    ("gathernd", "GatherND", 13, [_f(3, 4, 5), np.array([[0, 1], [2, 3]], np.int64)], {}, 1),
    ("expand-bidir", "Expand", 13, [_f(3, 1), _i(2, 1, 4)], {}, 1),
    ("tile", "Tile", 13, [_f(2, 3), _i(2, 3)], {}, 1),
    ("cast-int", "Cast", 13, [_f(3, 4) * 5], dict(to=TensorProto.INT32), 1),
    ("castlike", "CastLike", 15, [_f(3, 4) * 5, np.zeros(1, np.int64)], {}, 1),
    ("shape-start-end", "Shape", 15, [_f(2, 3, 4, 5)], dict(start=1, end=-1), 1),
    ("size", "Size", 13, [_f(2, 3, 4)], {}, 1),
    ("constantofshape", "ConstantOfShape", 9, [_i(2, 3)], dict(value=numpy_helper.from_array(np.array([7], np.int64))), 1),
    ("range", "Range", 11, [np.array(1.0, np.float32), np.array(4.0, np.float32), np.array(0.5, np.float32)], {}, 1),
    ("reducesum-13-input", "ReduceSum", 13, [_f(2, 3, 4), _i(0, -1)], dict(keepdims=0), 1),
    ("reducemean-noop", "ReduceMean", 18, [_f(2, 3), np.zeros(0, np.int64)], dict(noop_with_empty_axes=1), 1),
    ("reducemax-all", "ReduceMax", 18, [_f(2, 3, 4)], dict(keepdims=0), 1),
    ("reducemin-attr", "ReduceMin", 13, [_f(2, 3, 4)], dict(axes=[1]), 1),
    ("reduceprod", "ReduceProd", 18, [_f(2, 3, 4), _i(1, 2)], {}, 1),
    ("reducel2", "ReduceL2", 13, [_f(2, 3, 4)], dict(axes=[2], keepdims=0), 1),
    ("argmax-last", "ArgMax", 13, [np.array([[1, 3, 3], [2, 2, 0]], np.float32)], dict(axis=1, keepdims=0, select_last_index=1), 1),
    ("trilu-lower", "Trilu", 14, [_f(2, 4, 5), np.array(-1, np.int64)], dict(upper=0), 1),
    ("topk", "TopK", 11, [_f(3, 6), _i(2)], dict(axis=1), 2),
    ("where", "Where", 16, [_f(3, 4) > 0, _f(3, 4), _f(1, 4)], {}, 1),
    ("pow", "Pow", 15, [np.abs(_f(3, 4)) + 0.1, _f(4)], {}, 1),
    ("div-int", "Div", 14, [np.array([7, -7, 9], np.int64), np.array([2, 2, -4], np.int64)], {}, 1),
    ("mod-int", "Mod", 13, [np.array([7, -7, 9], np.int64), np.array([3, 3, -4], np.int64)], {}, 1),
    ("min-variadic", "Min", 13, [_f(3, 4), _f(4), _f(3, 1)], {}, 1),
    ("mean-variadic", "Mean", 13, [_f(3, 4), _f(4)], {}, 1),
    ("erf", "Erf", 13, [_f(3, 4)], {}, 1),
    ("reciprocal", "Reciprocal", 13, [np.abs(_f(3, 4)) + 0.5], {}, 1),
    ("less", "Less", 13, [_f(3, 4), _f(4)], {}, 1),
    ("and-not", "And", 7, [_f(3, 4) > 0, _f(3, 4) > 0], {}, 1),
]


@pytest.mark.parametrize("case", OPS, ids=[c[0] for c in OPS])
def test_single_operator_matches_onnxruntime(case):
    _, op, opset, inputs, attrs, n_out = case
    names, feeds, inits, vis = [], {}, [], []
    for k, arr in enumerate(inputs):
        if arr is None:
            names.append("")
            continue
        name = f"in{k}"
        names.append(name)
        if (k == 0 and arr.ndim > 0 and arr.dtype == np.float32) or (arr.dtype == np.float32 and arr.ndim > 1):
            feeds[name] = arr
            vis.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape))
        else:
            inits.append(numpy_helper.from_array(arr, name))
    outs = [f"out{k}" for k in range(n_out)]
    node = helper.make_node(op, names, outs, **attrs)
    graph = helper.make_graph([node], op, vis, [helper.make_empty_tensor_value_info(o) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if not vis:  # ORT needs a graph input: feed the first initializer instead
        first = inits.pop(0)
        arr = numpy_helper.to_array(first)
        feeds[first.name] = arr
        model.graph.input.append(helper.make_tensor_value_info(first.name, helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape))
        del model.graph.initializer[:]
        model.graph.initializer.extend(inits)
    for k, arr in enumerate(inputs):  # booleans are always fed
        if arr is not None and arr.dtype == bool and f"in{k}" not in feeds:
            feeds[f"in{k}"] = arr
            model.graph.input.append(helper.make_tensor_value_info(f"in{k}", TensorProto.BOOL, arr.shape))
            keep = [t for t in model.graph.initializer if t.name != f"in{k}"]
            del model.graph.initializer[:]
            model.graph.initializer.extend(keep)
    expected = ort_run(model, feeds)
    module = to_torch(model).eval()
    with torch.no_grad():
        got = module.forward_named({k: torch.from_numpy(np.array(v)) for k, v in feeds.items()})
    for o, e in zip(outs, expected):
        a = got[o].numpy()
        assert a.shape == e.shape, (a.shape, e.shape)
        if e.dtype.kind == "f":
            assert_close_rel(a, e, 1e-4)
        else:
            assert np.array_equal(a, e)
