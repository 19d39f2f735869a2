"""A fine-tune that goes non-finite fails (FinetuneError, exit 4 in a run) and names the first non-finite tensor
and the op that made it: in the forward pass, in a gradient, or in the evaluation (never "agreement nan")."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("torch")

from onnx_consensus.finetune.train import finetune  # noqa: E402
from onnx_consensus.bridge.torch_graph import to_torch  # noqa: E402
from onnx_consensus.errors import FinetuneError  # noqa: E402
from onnx_consensus.options import FinetuneConfig  # noqa: E402


def sqrt_net(zero: bool) -> onnx.ModelProto:
    """x (N, 4) -> MatMul W -> m -> Sqrt -> MatMul W2 -> logits (N, 3): a negative product makes Sqrt NaN in the
    forward pass. ``zero``: Sqrt(m - m) + m instead, finite forward (Sqrt(0) = 0), infinite derivative."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm")]
    if zero:
        nodes += [helper.make_node("Sub", ["m", "m"], ["z"], name="sub"),
                  helper.make_node("Sqrt", ["z"], ["s0"], name="sqrt"),
                  helper.make_node("Add", ["s0", "m"], ["s"], name="add")]
    else:
        nodes.append(helper.make_node("Sqrt", ["m"], ["s"], name="sqrt"))
    nodes.append(helper.make_node("MatMul", ["s", "W2"], ["logits"], name="head"))
    g = helper.make_graph(nodes, "sqrt", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])


def _batches(x, y):
    return lambda: [({"x": x}, y)]


X = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)
Y = np.arange(16) % 3


def test_first_nonfinite_tensor_of_a_forward_pass():
    module = to_torch(sqrt_net(zero=False))
    assert module.first_nonfinite({"x": X}) == "tensor 's' (Sqrt node 'sqrt')"
    assert module.first_nonfinite({"x": np.abs(X) * 0}) is None  # Sqrt(0): finite
    bad = X.copy()
    bad[0, 0] = np.nan
    assert module.first_nonfinite({"x": bad}) == "input 'x'"


def test_nonfinite_loss_names_the_tensor_and_its_op():
    with pytest.raises(FinetuneError, match=r"non-finite loss at epoch 1, step 1: first non-finite tensor 's' "
                                            r"\(Sqrt node 'sqrt'\)"):
        finetune(sqrt_net(zero=False), _batches(X, Y), config=FinetuneConfig(epochs=1, lr=0.01), progress=False)


def test_nonfinite_gradient_fails_before_the_weights_turn_nan():
    """The forward pass and the loss are finite; the gradient is not. Before, the step wrote NaN weights and
    the run reported their NaN fidelity as a result."""
    calls = []

    def evaluate(model):
        calls.append(model)
        return 1.0
    with pytest.raises(FinetuneError, match=r"non-finite gradient at epoch 1, step 1: the gradient of weight 'W' "
                                            r"\(read by MatMul node 'mm'\)"):
        finetune(sqrt_net(zero=True), _batches(X, Y), config=FinetuneConfig(epochs=1, lr=0.01), eval_fn=evaluate,
                 progress=False)
    assert not calls  # failed at the step, before any evaluation


def test_nan_evaluation_is_a_failed_finetune():
    model = sqrt_net(zero=False)
    ok = np.abs(X)  # non-negative inputs and weights: every product >= 0, the forward pass finite
    w = numpy_helper.to_array(model.graph.initializer[0])
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.abs(w), "W"))
    with pytest.raises(FinetuneError, match=r"fine-tuning diverged in epoch 1: the evaluation is nan"):
        finetune(model, _batches(ok, Y), config=FinetuneConfig(epochs=1, lr=0.01),
                 eval_fn=lambda m: float("nan"), progress=False)
