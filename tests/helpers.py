"""Model builders and graph utilities shared by the tests (no test functions here)."""
from __future__ import annotations

import os
import random
import shutil
import sys
import sysconfig

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, ".cache", "test-models")
# The CLI in a child process, importing the code under test (the repository root is the working directory).
CLI = [sys.executable, "-m", "onnx_consensus.cli"]


def resnet_onnx(depth: int = 20, form: str = "folded", seed: int = 0) -> onnx.ModelProto:
    """A CIFAR ResNet with random but well-scaled weights, exported in one of three forms:
    'folded' (classic exporter, BN folded into Conv, opset 17), 'bn' (classic, BN nodes kept, opset 13),
    'dynamo' (torch's dynamo exporter, opset 18). Exports are cached under .cache/ (they take seconds)."""
    return onnx.load(resnet_onnx_path(depth, form, seed))


def resnet_onnx_path(depth: int = 20, form: str = "folded", seed: int = 0) -> str:
    """The cached file of ``resnet_onnx(depth, form, seed)``, exported on first use. Every BatchNorm gets its
    own random statistics, so the exporter shares no tensors between layers."""
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"resnet{depth}-{form}-{seed}.onnx")
    if not os.path.exists(path):
        import torch

        from models.cifar_resnet import export_onnx, resnet

        torch.manual_seed(seed)
        net = resnet(depth)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.2, 0.6)
                    m.bias.uniform_(-0.1, 0.1)
        tmp = path + f".{os.getpid()}.tmp"
        opset = {"folded": 17, "bn": 13, "dynamo": 18}[form]
        export_onnx(net, tmp, opset=opset, fold_bn=form == "folded", dynamo=form == "dynamo")
        os.replace(tmp, path)
    return path


def randomize_names(model: onnx.ModelProto, seed: int = 0, keep_io: bool = False) -> onnx.ModelProto:
    """A copy with every node and tensor renamed at random (graph inputs/outputs too unless keep_io)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    rng = random.Random(seed)
    g = m.graph
    keep = {v.name for v in list(g.input) + list(g.output)} if keep_io else set()
    names: dict[str, str] = {}

    def new(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            names[name] = f"t{rng.randrange(10**9):09d}_{len(names)}"
        return names[name]

    for v in list(g.input) + list(g.output) + list(g.value_info):
        v.name = new(v.name)
    for t in g.initializer:
        t.name = new(t.name)
    for n in g.node:
        n.name = f"n{rng.randrange(10**9)}" if rng.random() < 0.7 else ""
        n.input[:] = [new(i) for i in n.input]
        n.output[:] = [new(o) for o in n.output]
    return m


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(t).dtype), name))
            return
    raise KeyError(name)


def zero_branch(model: onnx.ModelProto, block) -> None:
    """Make ``block``'s branch output exactly zero, in place (the one helper for every test).

    block: a generated block from tests.graphgen (a GenBlock: its ``zero_params`` name the branch's last
    weight and what follows it), or a detected Block (find_blocks) of a CIFAR ResNet: the last
    BatchNormalization's scale and bias (BN kept) or the last Conv's weight and bias (BN folded)."""
    names = getattr(block, "zero_params", None)
    if names is None:
        names = _last_branch_weights(model, block)
    for t in model.graph.initializer:
        if t.name in set(names):
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))


def _last_branch_weights(model: onnx.ModelProto, block) -> list[str]:
    by_out = {n.output[0]: n for n in model.graph.node}
    nodes = [by_out[k] for k in block.nodes]
    inits = {t.name for t in model.graph.initializer}
    for op, slots in (("BatchNormalization", (1, 2)), ("Conv", (1, 2))):
        last = [n for n in nodes if n.op_type == op]
        if last:
            n = last[-1]
            return [n.input[s] for s in slots if s < len(n.input) and n.input[s] in inits]
    raise ValueError("no BatchNormalization or Conv in the block")


def temporaries(folder) -> list[str]:
    """Temporary files an interrupted or failed write could have left in ``folder``."""
    return [f for f in os.listdir(folder) if f.endswith(".tmp") or ".tmp." in f]


def installed_entry_point(name: str = "onnx-cprune") -> str | None:
    """Path of the console script ``name`` installed for this interpreter (its scripts directory first, then
    PATH), or None when the package is not installed."""
    here = os.path.join(sysconfig.get_path("scripts"), name)
    return here if os.access(here, os.X_OK) else shutil.which(name)


def env_with_root() -> dict[str, str]:
    """The environment for a child process that must import this checkout's onnx_consensus (PYTHONPATH
    first, ahead of an editable install's finder that may point to another checkout)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


def tiny_residual_graph(*, exit_is_output: bool = False, side_input: bool = False, opset: int = 13,
                        merge: str = "Add", seq: bool = False) -> onnx.ModelProto:
    """x(N,4) -> MatMul -> [block: h + Relu(MatMul(h))] -> MatMul -> y(N,3).
    exit_is_output: the block's exit is also a graph output. side_input: the branch adds a second graph
    input 'bias' (N,4) inside (a side input, not an extra entry). seq: every tensor gets a dynamic middle
    axis S, x(N,S,4) -> y(N,S,3), so MACs are unknown until S is given (MACs = N*S*(16 + 16 + 12))."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"]),
             helper.make_node("MatMul", ["h", "w1"], ["b0"])]
    if side_input:
        nodes.append(helper.make_node("Mul", ["b0", "bias"], ["b1"]))
    nodes.append(helper.make_node("Relu", ["b1" if side_input else "b0"], ["b2"]))
    nodes.append(helper.make_node(merge, ["h", "b2"], ["r"]))
    nodes.append(helper.make_node("MatMul", ["r", "w2"], ["y"]))
    lead = ["N", "S"] if seq else ["N"]
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [*lead, 4])]
    if side_input:
        inputs.append(helper.make_tensor_value_info("bias", onnx.TensorProto.FLOAT, [*lead, 4]))
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [*lead, 3])]
    if exit_is_output:
        outputs.append(helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [*lead, 4]))
    g = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def residual_mlp(blocks: int = 6, width: int = 16, *, seed: int = 0, opset: int = 17,
                 dtype=np.float32) -> onnx.ModelProto:
    """x(N,width) -> blocks of h + Relu(h @ W_k) -> h @ head -> logits(N,10); weights in ``dtype``
    (float32, float16 or ml_dtypes.bfloat16), the interface in the same type. Block k's exit is 'h{k}'."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for k in range(blocks):
        w = rng.standard_normal((width, width)) / np.sqrt(width) * (0.2 + 0.1 * k)
        inits.append(numpy_helper.from_array(w.astype(np.float32).astype(dtype), f"w{k}"))
        nodes += [helper.make_node("MatMul", [x, f"w{k}"], [f"m{k}"]), helper.make_node("Relu", [f"m{k}"], [f"r{k}"]),
                  helper.make_node("Add", [x, f"r{k}"], [f"h{k}"])]
        x = f"h{k}"
    inits.append(numpy_helper.from_array((rng.standard_normal((width, 10)) * 0.3).astype(np.float32).astype(dtype),
                                         "head"))
    nodes.append(helper.make_node("MatMul", [x, "head"], ["logits"]))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", elem, ["N", width])],
                          [helper.make_tensor_value_info("logits", elem, ["N", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def genai_generate(og, folder, max_length: int, prompt=(5, 17, 300, 42)) -> list[int]:
    """Greedy generation in onnxruntime-genai (module ``og``) from the export ``folder``: the token ids,
    prompt included, ``max_length`` long unless the model stops early."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([list(prompt)], np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return list(gen.get_sequence(0))
