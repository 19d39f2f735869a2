"""One rank of the distributed fine-tuning tests (tests/test_distributed.py); no test functions here.

    RANK=r WORLD_SIZE=2 LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/ddp_worker.py CASES WORKDIR

(or ``torchrun --nproc_per_node 2 tests/ddp_worker.py CASES WORKDIR``); CASES is comma-separated, run in
order in one process group (importing torch and torch._dynamo, which torch.optim pulls in, costs each
process several CPU seconds: the tests launch as few process pairs as they can). The cases share their models,
data and configuration with the single-process reference runs of the tests through ``setup`` and
``config``. Rank 0 writes WORKDIR/CASE.onnx; every rank dumps its final weights to
WORKDIR/CASE.rank<r>.npz (a test artifact: comparing ranks). Exit codes as the CLI's: 0, 4 (fine-tuning
failed or stopped by a peer), 130 (interrupted).
"""
from __future__ import annotations

import os
import shutil
import signal
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

N_SAMPLES = 24  # 3 steps per epoch: per-rank batch 4 on 2 ranks, batch 8 in one process
PER_RANK_BATCH = 4
CASES = ("supervised", "distill", "bn", "uneven", "unused", "fail", "sigterm")


def conv_bn(seed: int = 0) -> onnx.ModelProto:
    """x(N,3,8,8) -> Conv 3x3 (8 ch) -> BatchNormalization -> Relu -> GlobalAveragePool -> Flatten -> Gemm ->
    logits(N,10): a BN graph small enough for a two-process test."""
    rng = np.random.default_rng(seed)
    f = np.float32
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(f), "conv.w"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(f), "bn.scale"),
             numpy_helper.from_array(rng.uniform(-0.1, 0.1, 8).astype(f), "bn.bias"),
             numpy_helper.from_array(rng.uniform(-0.1, 0.1, 8).astype(f), "bn.mean"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(f), "bn.var"),
             numpy_helper.from_array((rng.standard_normal((10, 8)) * 0.3).astype(f), "fc.w"),
             numpy_helper.from_array(np.zeros(10, f), "fc.b")]
    nodes = [helper.make_node("Conv", ["x", "conv.w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b"]),
             helper.make_node("Relu", ["b"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1)]
    g = helper.make_graph(nodes, "conv_bn", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])


def setup(case: str, workdir: str):
    """(student, teacher or None, training data) of ``case``; writes the data under workdir once."""
    from onnx_consensus.data import load_calibration
    from tests.helpers import residual_mlp

    if case == "bn":
        student, teacher = conv_bn(), None
        shape = (3, 8, 8)
    elif case == "distill":
        student, teacher = residual_mlp(4, 16, seed=1), residual_mlp(4, 16, seed=0)
        shape = (16,)
    else:
        student, teacher = residual_mlp(4, 16, seed=0), None
        shape = (16,)
    if case == "unused":  # a second output with its own weight, which training on logits never reads
        g = student.graph
        g.initializer.append(numpy_helper.from_array(np.full((16, 2), 0.1, np.float32), "w_aux"))
        g.node.append(helper.make_node("MatMul", ["h3", "w_aux"], ["aux"]))
        g.output.append(helper.make_tensor_value_info("aux", onnx.TensorProto.FLOAT, ["N", 2]))
    folder = os.path.join(workdir, f"data-{case}")
    if not os.path.isdir(folder):
        tmp = f"{folder}.{os.getpid()}.tmp"
        os.makedirs(tmp)
        rng = np.random.default_rng(7)
        np.save(os.path.join(tmp, "x.npy"), rng.standard_normal((N_SAMPLES, *shape)).astype(np.float32))
        if case != "distill":
            np.save(os.path.join(tmp, "labels.npy"), rng.integers(0, 10, N_SAMPLES))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process made it first
            shutil.rmtree(tmp)
    return student, teacher, load_calibration(folder, student)


def config(case: str):
    from onnx_consensus.options import FinetuneConfig

    # the recipe's SGD (Nesterov momentum 0.9, cosine schedule, clipping at norm 1): deterministic, so
    # it must match too. bn: lr 0, only the running statistics move (per-rank batch statistics would
    # otherwise make the gradients differ from one process's).
    # bn_stats="update": the running statistics are what this case checks (the default freezes them on
    # small training sets).
    return FinetuneConfig(epochs=2, lr=0.0 if case == "bn" else 0.05, seed=3, threads=1, bn_stats="update")


def uneven(factory, rank: int):
    """Rank 1 gets one batch fewer per epoch than rank 0 (and no len(): a constant learning rate)."""
    def next_epoch():
        batches = list(factory())
        return iter(batches[:-1] if rank == 1 else batches)
    return next_epoch


def faulty(factory, rank: int, case: str):
    """On rank 1, at the second batch of the first epoch: raise (fail) or SIGTERM itself (sigterm)."""
    calls = [0]

    def next_epoch():
        calls[0] += 1
        epoch = calls[0]

        def gen():
            for k, batch in enumerate(factory()):
                if rank == 1 and epoch == 1 and k == 1:
                    if case == "fail":
                        raise OSError("simulated read error on rank 1")
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch
        return gen()
    return next_epoch


def main(cases: str, workdir: str) -> int:
    from onnx_consensus.bridge.distributed import joined
    from onnx_consensus.errors import ConsensusError

    try:
        with joined("cpu", timeout_s=300) as ctx:
            for case in cases.split(","):
                run(ctx, case, workdir)
    except KeyboardInterrupt:
        print("ddp_worker: interrupted; nothing written", file=sys.stderr)
        return 130
    except ConsensusError as exc:
        print(f"ddp_worker: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def run(ctx, case: str, workdir: str) -> None:
    from onnx_consensus.finetune.epochs import training_batches
    from onnx_consensus.finetune.train import finetune
    from onnx_consensus.bridge.torch_graph import to_torch
    from onnx_consensus.io import save_model_atomic

    student, teacher, data = setup(case, workdir)
    batches = training_batches(data, PER_RANK_BATCH, seed=11, dist=ctx)
    if case == "uneven":
        batches = uneven(batches, ctx.rank)
    elif case in ("fail", "sigterm"):
        batches = faulty(batches, ctx.rank, case)
    model, _ = finetune(student, batches, teacher=teacher, config=config(case), progress=False, dist=ctx)
    state = {k: v.detach().numpy() for k, v in to_torch(model).onnx_state().items()}
    np.savez(os.path.join(workdir, f"{case}.rank{ctx.rank}.npz"), **state)
    ctx.main_only(save_model_atomic, model, os.path.join(workdir, f"{case}.onnx"))


if __name__ == "__main__":
    from onnx_consensus.cli import exit_process

    exit_process(main(sys.argv[1], sys.argv[2]))
