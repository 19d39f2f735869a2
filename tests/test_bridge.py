"""The PyTorch bridge: parity with onnxruntime, gradients, BN training semantics, write-back, the weight
rule, unsupported operators, and fine-tuning. onnxruntime is the independent reference throughout."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from bridge_models import (DigitsNet, digits_data, export_case, old_inputs, old_opset8_model,
                           old_opset11_model)
from onnx_consensus.bridge import (FinetuneConfig, FinetuneResult, OnnxModule, check_supported, finetune,
                                   to_torch, write_back)
from onnx_consensus.errors import FinetuneError, UnsupportedOperatorError

torch.set_num_threads(1)  # 2 shared, busy cores: more threads only spin

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
def models(tmp_path_factory):
    out = tmp_path_factory.mktemp("bridge")
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            if name == "old11":
                cache[name] = (old_opset11_model(), old_inputs((8, 8, 3)))
            elif name == "old8":
                cache[name] = (old_opset8_model(), old_inputs((3, 6, 6)))
            else:
                cache[name] = export_case(name, str(out))
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
