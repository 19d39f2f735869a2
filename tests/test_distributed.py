"""Data-parallel fine-tuning (bridge/distributed.py, finetune/epochs.py): sharding, and two gloo processes against one.

The two-process runs launch tests/ddp_worker.py twice with torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free localhost port), as torchrun's agent would.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest

from onnx_consensus.bridge.distributed import from_env, joined, launched
from onnx_consensus.finetune.epochs import shard_indices, training_batches
from onnx_consensus.finetune.train import finetune
from onnx_consensus.bridge.torch_graph import to_torch
from onnx_consensus.errors import InputError
from tests import ddp_worker as W

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "ddp_worker.py")


# ---- sharding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n,world", [(24, 2), (25, 2), (10, 3), (7, 7)])
def test_shards_equal_sized_cover_all_and_stride_the_permutation(n, world):
    shards = [shard_indices(n, r, world, seed=5, epoch=2) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-n // world)
    assert set(np.concatenate(shards)) == set(range(n))
    # batch k of B on every rank = entries [k*B*world, (k+1)*B*world) of one process's order
    perm = np.random.default_rng(5 * 1_000_003 + 2).permutation(n)
    padded = np.concatenate([perm, perm[: -n % world]])
    b = 2
    for k in range(len(shards[0]) // b):
        union = np.concatenate([s[k * b:(k + 1) * b] for s in shards])
        assert sorted(union) == sorted(padded[k * b * world:(k + 1) * b * world])
    dropped = [shard_indices(n, r, world, seed=5, epoch=2, drop_last=True) for r in range(world)]
    assert len(np.concatenate(dropped)) == len(set(np.concatenate(dropped))) == n - n % world


def test_shards_reshuffle_per_epoch_and_need_a_sample_per_rank():
    assert not np.array_equal(shard_indices(100, 0, 2, seed=0, epoch=1), shard_indices(100, 0, 2, seed=0, epoch=2))
    assert np.array_equal(shard_indices(100, 1, 2, seed=0, epoch=3), shard_indices(100, 1, 2, seed=0, epoch=3))
    with pytest.raises(InputError, match="cannot be shared"):
        shard_indices(1, 0, 2, seed=0, epoch=1)
    with pytest.raises(InputError, match="rank 2"):
        shard_indices(10, 2, 2, seed=0, epoch=1)


def _arrays(data):
    folder = os.path.dirname(data.files[0])
    return np.load(os.path.join(folder, "x.npy")), np.load(os.path.join(folder, "labels.npy"))


def test_one_process_batches_follow_the_seeded_permutation(tmp_path):
    _, _, data = W.setup("supervised", str(tmp_path))
    x, y = _arrays(data)
    epochs = training_batches(data, 5, seed=4)
    for epoch in (1, 2):  # reshuffled every epoch: epoch e takes the samples in the order of its permutation
        perm = np.random.default_rng(4 * 1_000_003 + epoch).permutation(len(x))
        batches = list(epochs())
        assert len(batches) == -(-len(x) // 5)
        for k, (feeds, labels) in enumerate(batches):
            np.testing.assert_array_equal(feeds["x"], x[perm[5 * k:5 * k + 5]])
            np.testing.assert_array_equal(labels, y[perm[5 * k:5 * k + 5]])


class _Rank:
    """What the epoch source reads of a DistContext."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size


def test_rank_batches_together_are_the_one_process_batch(tmp_path):
    """Two ranks with batch B: the union of their k-th batches is one process's k-th batch of 2B, every epoch;
    each epoch counts every training sample (the BN rule's n_samples), not the shard's."""
    _, _, data = W.setup("supervised", str(tmp_path))
    one = training_batches(data, 8, seed=3)
    ranks = [training_batches(data, 4, seed=3, dist=_Rank(r, 2)) for r in range(2)]
    for _ in range(2):
        whole, e0, e1 = one(), ranks[0](), ranks[1]()
        assert e0.n_samples == e1.n_samples == whole.n_samples == data.n_samples
        for (f, lab), (f0, l0), (f1, l1) in zip(whole, e0, e1):
            rows = sorted(map(tuple, np.concatenate([f0["x"], f1["x"]]).reshape(len(l0) + len(l1), -1)))
            assert rows == sorted(map(tuple, f["x"].reshape(len(lab), -1)))
            assert sorted(np.concatenate([l0, l1])) == sorted(lab)


def test_from_env_outside_torchrun_and_bad_environments():
    assert from_env(env={}) is None and not launched({})
    with joined(env={}) as ctx:
        assert ctx is None
    with pytest.raises(InputError, match="MASTER_ADDR"):
        from_env(env={"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(InputError, match="inconsistent"):
        from_env(env={"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})
    with pytest.raises(InputError, match="integers"):
        from_env(env={"RANK": "a", "WORLD_SIZE": "2"})
    with pytest.raises(InputError, match="CUDA is not available"):
        from_env("cuda", env={"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"})


# ---- two processes --------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cases: str, workdir: str, world: int = 2, timeout: float = 150.0) -> list[tuple[int, str]]:
    """Run ``world`` ranks of ddp_worker CASES; [(exit code, stderr)] per rank."""
    for case in cases.split(","):
        W.setup(case, workdir)  # the data, written once before the ranks read it
    port = _free_port()
    procs = []
    t0 = time.perf_counter()
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        err = open(os.path.join(workdir, f"{cases.replace(',', '-')}.rank{rank}.err"), "w+")
        procs.append((subprocess.Popen([sys.executable, WORKER, cases, workdir], env=env, stdout=subprocess.DEVNULL,
                                       stderr=err, start_new_session=True), err))
    out = []
    try:
        for p, err in procs:
            p.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
            err.seek(0)
            out.append((p.returncode, err.read()))
    finally:
        for p, err in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            err.close()
    return out


def _reference(case: str, workdir: str) -> dict[str, np.ndarray]:
    """The same fine-tuning in this process: one rank, batch 2 x PER_RANK_BATCH, same seeds."""
    student, teacher, data = W.setup(case, workdir)
    batches = training_batches(data, 2 * W.PER_RANK_BATCH, seed=11)
    if case == "uneven":  # the ranks stop each epoch when rank 1 runs out: after 2 of 3 batches
        full = batches
        batches = lambda: iter(list(full())[:2])  # noqa: E731
    model, _ = finetune(student, batches, teacher=teacher, config=W.config(case), progress=False)
    return {k: v.detach().numpy() for k, v in to_torch(model).onnx_state().items()}


def _written(workdir: str, case: str) -> dict[str, np.ndarray]:
    model = onnx.load(os.path.join(workdir, f"{case}.onnx"))
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """One pair of gloo ranks runs the successful cases in turn, then one where rank 1 raises at its
    second batch (importing torch costs each process seconds: one launch instead of five)."""
    workdir = str(tmp_path_factory.mktemp("ddp"))
    return workdir, _launch("supervised,distill,unused,uneven,bn,fail", workdir)


@pytest.fixture(scope="module")
def trained(launch):
    workdir, _ = launch
    for case in ("supervised", "distill", "unused", "uneven", "bn"):
        assert os.path.exists(os.path.join(workdir, f"{case}.onnx")), launch[1]
    return workdir


@pytest.mark.parametrize("case", ["supervised", "distill", "unused"])
def test_two_gloo_ranks_match_one_process_with_twice_the_batch(trained, case):
    """2 ranks x batch 4 == 1 process x batch 8 after 6 steps (2 epochs, reshuffled) of the recipe's SGD
    (Nesterov momentum, cosine lr, clipping): the written model, and both ranks hold the same weights.
    unused: a weight that only feeds a second output, which training never computes (DDP must not wait
    for its gradient)."""
    ref = _reference(case, trained)
    written = _written(trained, case)
    ranks = [dict(np.load(os.path.join(trained, f"{case}.rank{r}.npz"))) for r in range(2)]
    student = W.setup(case, trained)[0]
    original = {t.name: onnx.numpy_helper.to_array(t) for t in student.graph.initializer}
    for name, value in ref.items():
        if name == "w_aux":
            np.testing.assert_array_equal(written[name], original[name])
            continue
        assert not np.allclose(value, original[name], atol=1e-4), f"{name} did not train"
        np.testing.assert_allclose(written[name], value, rtol=2e-5, atol=2e-6, err_msg=name)
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name], err_msg=name)


def test_two_ranks_with_uneven_batches_end_each_epoch_together(trained):
    """Rank 1 has one batch fewer per epoch: both stop the epoch there and the run equals one process
    taking the first two double batches of each epoch."""
    ref = _reference("uneven", trained)
    written = _written(trained, "uneven")
    for name, value in ref.items():
        np.testing.assert_allclose(written[name], value, rtol=2e-5, atol=2e-6, err_msg=name)


def test_batchnorm_running_statistics_are_averaged_over_ranks(trained):
    """BN graph, lr 0: only the running statistics move. Averaged over the ranks every epoch, the
    running mean is one process's (momentum averaging is linear; equal shards); the running variance
    lacks the spread of the per-rank means, so it is close but not equal."""
    ref = _reference("bn", trained)
    written = _written(trained, "bn")
    start = {t.name: onnx.numpy_helper.to_array(t) for t in W.conv_bn().graph.initializer}
    assert not np.allclose(written["bn.mean"], start["bn.mean"], atol=1e-3)
    np.testing.assert_allclose(written["bn.mean"], ref["bn.mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(written["bn.var"], ref["bn.var"], rtol=0.05)
    np.testing.assert_array_equal(written["conv.w"], start["conv.w"])


def _check_stopped(results, workdir, case, codes, messages):
    assert [r[0] for r in results] == codes, results
    for (_, err), want in zip(results, messages):
        assert want in err, err
    assert not os.path.exists(os.path.join(workdir, f"{case}.onnx"))
    assert not [f for f in os.listdir(workdir) if f.startswith(case) and f.endswith(".npz")]


def test_one_rank_failing_stops_both_promptly_and_nothing_is_written(launch):
    """Rank 1 raises at its second batch: both ranks stop at that step and exit 4 with one line saying
    why, long before the 300 s collective timeout (the launch's own limit is 150 s); nothing is written."""
    workdir, results = launch
    _check_stopped(results, workdir, "fail", [4, 4], ["rank 1 failed", "simulated read error on rank 1"])


def test_one_rank_sigterm_stops_both_and_nothing_is_written(tmp_path):
    """Rank 1 receives SIGTERM at its second batch: it exits 130 (interrupted), rank 0 exits 4 saying
    rank 1 was interrupted; nothing is written."""
    results = _launch("sigterm", str(tmp_path))
    _check_stopped(results, str(tmp_path), "sigterm", [4, 130], ["rank 1 was interrupted",
                                                                  "interrupted; nothing written"])
