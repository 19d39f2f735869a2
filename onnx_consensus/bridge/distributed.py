"""Data-parallel fine-tuning over several processes with ``torch.distributed`` (launched by ``torchrun``).

One process per rank; each rank holds the whole student (an OnnxModule wrapped in
``DistributedDataParallel``, gradients all-reduced and averaged in backward), runs its own onnxruntime
teacher, and reads only its shard of the training index. Only rank 0 evaluates and writes.

    with joined(device="cpu") as ctx:         # None when not launched by torchrun (WORLD_SIZE unset)
        batches = sharded_batches(train_data, batch_size=32, ctx=ctx, seed=0)
        model, result = finetune(student, batches, teacher=original, config=config, dist=ctx)
        if ctx is None:
            save_model_atomic(model, "out.onnx")
        else:                                  # rank 0 writes; the others learn the outcome
            ctx.main_only(save_model_atomic, model, "out.onnx")

Equivalence: N ranks with per-rank batch B take the same steps as one process with batch N*B over the
same seeded permutation (``shard_indices`` strides the permutation, so the union of the ranks' k-th
batches is the single process's k-th batch), up to float32 summation order. Exception:
BatchNormalization in train mode normalises with each rank's own batch statistics (no SyncBatchNorm
for a graph module: "ghost" batches of B); the running statistics are averaged over ranks at the end of
every epoch, so rank 0 writes statistics of all the data (the running mean exactly as one process
would, the variance without the spread of the per-rank means).

Stopping: every step, after the local work (data, teacher, forward, loss) and before the gradient
all-reduce, the ranks exchange a small flag vector (``DistContext.vote``). A rank that raised, was sent
SIGINT/SIGTERM or ran out of batches says so; then every rank stops at that same step (PeerStopped on
the others, the original exception or KeyboardInterrupt on the rank concerned) or, for an exhausted
rank, ends the epoch. Nothing is written because writing comes after ``finetune`` returns. A rank that
dies without voting (SIGKILL) breaks the gloo connections (the others fail at once) or, with NCCL,
is caught by the process group timeout.
"""
from __future__ import annotations

import logging
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from ..errors import FinetuneError, InputError
from .torch_graph import OnnxModule

log = logging.getLogger("onnx_consensus")

__all__ = ["DistContext", "PeerStopped", "from_env", "joined", "launched", "shard_indices", "sharded_batches",
           "epoch_permutation"]

_ENV = ("RANK", "WORLD_SIZE")
_FAILED, _SIGNALLED, _EXHAUSTED, _FAILED_RANK, _SIGNALLED_RANK = range(5)


class PeerStopped(FinetuneError):
    """Another rank failed or was interrupted; this rank stopped at the same step (exit 4)."""


def launched(env: dict[str, str] | None = None) -> bool:
    """True when the process was started by torchrun (or anything setting RANK and WORLD_SIZE)."""
    env = os.environ if env is None else env
    return all(k in env for k in _ENV)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded order of the n training samples in ``epoch`` (1-based): (n,) int64. The same
    permutation as ``recover.training_batches`` draws for its epoch ``epoch``."""
    return np.random.default_rng(seed * 1_000_003 + epoch).permutation(n)


def shard_indices(n: int, rank: int, world_size: int, *, seed: int, epoch: int,
                  drop_last: bool = False) -> np.ndarray:
    """This rank's sample indices for one epoch, (ceil(n / world_size),) int64 (floor with drop_last).

    Like torch's DistributedSampler: the epoch's seeded permutation (``epoch_permutation``) is padded
    by repeating its head to a multiple of world_size (or cut to one with ``drop_last``) and rank r takes
    every world_size-th entry starting at r, so all shards have the same size and together cover every
    sample (a few twice when padded). Taken in order, batch k of B samples on every rank together form
    entries [k*B*world_size, (k+1)*B*world_size) of the padded permutation.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"rank {rank} is not in a world of {world_size} process(es)")
    if n < world_size:
        raise InputError(f"{n} training sample(s) cannot be shared among {world_size} processes")
    perm = epoch_permutation(n, seed, epoch)
    if drop_last:
        perm = perm[: n - n % world_size]
    else:
        pad = -n % world_size
        perm = np.concatenate([perm, perm[:pad]])
    return perm[rank::world_size]


class _ShardEpoch:
    """One epoch of (inputs by name, labels (B,) int64 or None) batches of this rank's shard;
    len() is the number of batches (the bridge lays its cosine schedule over it)."""

    def __init__(self, data, indices: np.ndarray, batch_size: int):
        self.data, self.indices, self.batch_size = data, indices, batch_size

    def __len__(self) -> int:
        fixed = self.data.fixed_batch
        if fixed:  # a short (padded) last batch is dropped
            return max(len(self.indices) // fixed, 1)
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        from ..batching import counted_batches

        fixed = self.data.fixed_batch
        offset = 0
        for feeds, n in counted_batches(self.data, self.batch_size, self.indices):
            labels = self.data.labels_for(self.indices[offset:offset + n])
            offset += n
            if fixed and n < fixed:  # a model with a fixed batch: train on full batches, never on padding
                if len(self.indices) >= fixed:
                    continue
                if labels is not None:
                    labels = np.concatenate([labels, np.repeat(labels[-1:], fixed - n)])
            yield feeds, labels


def sharded_batches(data, batch_size: int, ctx: "DistContext | None", seed: int = 0,
                    *, drop_last: bool = False) -> Callable[[], _ShardEpoch]:
    """A factory of epochs for ``finetune(train_batches=...)``: each call returns the next epoch's
    batches of this rank's shard (``shard_indices``), read lazily from ``data`` (a CalibrationData: only
    this shard's samples are read). ``batch_size`` is per rank. ctx None: one process, all samples, the
    same batches as ``recover.training_batches(data, batch_size, seed)``."""
    rank, world = (0, 1) if ctx is None else (ctx.rank, ctx.world_size)
    count = [0]

    def next_epoch() -> _ShardEpoch:
        count[0] += 1
        idx = shard_indices(data.n_samples, rank, world, seed=seed, epoch=count[0], drop_last=drop_last)
        return _ShardEpoch(data, idx, batch_size)
    return next_epoch


class _Forward(nn.Module):
    """What DDP wraps: forward(inputs by name, output names) -> OnnxModule.forward_named(...)."""

    def __init__(self, module: OnnxModule):
        super().__init__()
        self.graph = module

    def forward(self, inputs: dict[str, torch.Tensor], outputs: list[str]) -> dict[str, torch.Tensor]:
        return self.graph.forward_named(inputs, outputs)


def _used_parameters(module: OnnxModule, outputs: list[str]) -> set[str]:
    """ONNX names of the trainable tensors the schedule for ``outputs`` reads."""
    read = {n for step in module._plan(tuple(outputs)) for n in step[2] if n}
    return read & set(module.trainable_names)


@dataclass
class DistContext:
    """One rank's membership of the process group.

    rank/world_size: global; local_rank: on this machine (selects the GPU); backend 'gloo' (CPU) or
    'nccl' (CUDA); device: where this rank's student lives; timeout_s: seconds any collective may wait
    for a peer. Use as a context manager: it installs SIGINT/SIGTERM handlers that turn a signal into a
    stop at the next ``vote`` of all ranks (a second signal raises KeyboardInterrupt at once) and
    destroys the process group on exit.
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    timeout_s: float
    _signal: int | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)
    _old_handlers: dict = field(default_factory=dict, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that evaluates, reports and writes."""
        return self.rank == 0

    # ---- lifetime --------------------------------------------------------------------------------

    def __enter__(self) -> "DistContext":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Restore the signal handlers and leave the process group (idempotent)."""
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()
        if tdist.is_initialized():
            try:
                tdist.destroy_process_group()
            except Exception as exc:  # noqa: BLE001 - a broken group still has to be left
                log.debug("destroy_process_group: %s", exc)

    def _on_signal(self, signum, frame) -> None:
        if self._signal is not None:  # second signal: do not wait for the next vote
            raise KeyboardInterrupt
        self._signal = signum
        log.warning("rank %d: %s received, all ranks stop at the next step", self.rank,
                    signal.Signals(signum).name)

    # ---- training ---------------------------------------------------------------------------------

    def wrap(self, module: OnnxModule, outputs: list[str]) -> nn.Module:
        """``module`` (already on ``device``) in DistributedDataParallel; call the result as
        ``ddp(inputs_by_name, outputs) -> {name: tensor}``. Rank 0's weights are broadcast to all ranks
        here. Buffers (BN running statistics) are not broadcast each step: see ``average_buffers``."""
        unused = bool(set(module.trainable_names) - _used_parameters(module, outputs))
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(_Forward(module), device_ids=ids, forward_sync_buffers=False,
                                                   find_unused_parameters=unused)

    def vote(self, *, failed: bool = False, exhausted: bool = False) -> bool:
        """Collective (every rank must call it at the same point): exchange this rank's state.

        Raises KeyboardInterrupt on a rank that received SIGINT/SIGTERM, PeerStopped on the others when
        any rank failed or was interrupted. Otherwise returns True when some rank has run out of batches
        (every rank then ends the epoch), False to go on."""
        sig = self._signal
        flags = torch.zeros(5, dtype=torch.int64)
        flags[_FAILED] = int(failed)
        flags[_SIGNALLED] = int(sig is not None)
        flags[_EXHAUSTED] = int(exhausted)
        flags[_FAILED_RANK] = self.rank + 1 if failed else 0
        flags[_SIGNALLED_RANK] = self.rank + 1 if sig is not None else 0
        flags = flags.to(self.device)
        tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
        flags = flags.cpu().tolist()
        if flags[_FAILED] or flags[_SIGNALLED]:
            self._stopped = True
            if sig is not None:
                raise KeyboardInterrupt
            if failed:
                return True  # the caller re-raises its own error
            if flags[_FAILED]:
                raise PeerStopped(f"rank {flags[_FAILED_RANK] - 1} failed; all {self.world_size} ranks stopped, "
                                  "nothing written")
            raise PeerStopped(f"rank {flags[_SIGNALLED_RANK] - 1} was interrupted; all {self.world_size} ranks "
                              "stopped, nothing written")
        return bool(flags[_EXHAUSTED])

    def abort(self) -> None:
        """Tell the other ranks this one is failing (the failure's side of their next ``vote``); a
        no-op when a vote already stopped everyone. Never raises."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.vote(failed=True)
        except BaseException as exc:  # noqa: BLE001 - peers gone or a second signal: nothing more to tell
            log.debug("rank %d: abort vote: %s", self.rank, exc)

    def lockstep(self, batches: Iterable[Any], done: Callable[[], bool] = lambda: False) -> Iterator[Any]:
        """Yield ``batches`` until ``done()`` (the same on every rank, e.g. a step budget spent: checked
        before fetching, so no rank fetches a batch it will not use); when they run out, vote "exhausted"
        so that the ranks still holding batches end the epoch with this one instead of waiting for it in
        a collective."""
        iterator = iter(batches)
        while not done():
            try:
                item = next(iterator)
            except StopIteration:
                self.vote(exhausted=True)
                return
            yield item

    def average_buffers(self, module: OnnxModule) -> None:
        """Collective: replace the BatchNormalization running statistics by their mean over ranks."""
        bufs = module.consts._buffers
        names = list(module.mutable_buffers) + list(module._aliases)
        tensors = [bufs[module.onnx_to_key[n]] for n in names]
        tensors = [t for t in tensors if t.is_floating_point()]
        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        with torch.no_grad():
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].reshape(t.shape).to(t.dtype))
                offset += t.numel()

    def main_only(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Collective: run ``fn(*args, **kwargs)`` on rank 0 only (writing a model or a report) and let
        every rank learn whether it succeeded. Returns fn's result on rank 0, None elsewhere; a failure
        on rank 0 is re-raised there and raises PeerStopped on the others."""
        result = None
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                self.abort()
                raise
        self.vote()
        return result


def from_env(device: str = "cpu", *, timeout_s: float = 600.0,
             env: dict[str, str] | None = None) -> DistContext | None:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); None when not launched that way (one process, no group).

    device 'cpu' -> backend gloo; 'cuda' or 'cuda:k' -> backend nccl on cuda:LOCAL_RANK (with one
    process, cuda:k as given). Raises InputError for an inconsistent environment or an unusable
    device, FinetuneError when the group cannot be formed within ``timeout_s`` seconds.
    """
    env = dict(os.environ if env is None else env)
    if not launched(env):
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise InputError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got {env.get('RANK')!r}/"
                         f"{env.get('WORLD_SIZE')!r}/{env.get('LOCAL_RANK')!r}") from None
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise InputError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local_rank}")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise InputError(f"distributed run without {' and '.join(missing)} in the environment (launch with torchrun)")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r} requested but CUDA is not available to this torch build")
        index = local_rank if world > 1 or dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise InputError(f"rank {rank} needs cuda:{index} but this machine has {torch.cuda.device_count()} "
                             "GPU(s): use --nproc_per_node <= the GPU count")
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise InputError(f"distributed fine-tuning supports cpu (gloo) and cuda (nccl) devices, not {device!r}")
    if not tdist.is_available() or not getattr(tdist, f"is_{backend}_available")():
        raise InputError(f"this torch build has no {backend} backend for torch.distributed")
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        os.environ.setdefault(k, env[k])
    try:
        tdist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                 timeout=timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 - rendezvous failures: one line
        msg = " ".join(str(exc).split())[:300]
        raise FinetuneError(f"rank {rank}: cannot join the {backend} process group at "
                            f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}: {type(exc).__name__}: {msg}") from exc
    ctx = DistContext(rank, world, local_rank, backend, dev, timeout_s)
    log.info("rank %d/%d (local %d) joined the %s group on %s", rank, world, local_rank, backend, dev)
    return ctx


@contextmanager
def joined(device: str = "cpu", *, timeout_s: float = 600.0, env: dict[str, str] | None = None):
    """``with joined(device) as ctx:`` -- ctx is the entered DistContext under torchrun (left on exit),
    None in a plain process: the same code path serves both (pass ``dist=ctx`` and ``sharded_batches(...,
    ctx)`` either way)."""
    ctx = from_env(device, timeout_s=timeout_s, env=env)
    if ctx is None:
        yield None
        return
    with ctx:
        yield ctx
