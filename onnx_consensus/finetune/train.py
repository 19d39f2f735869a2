"""The fine-tuning loop: an ONNX model trained through the PyTorch bridge (``bridge.to_torch``), its weights written
back into the same graph (``bridge.write_back``) after every epoch, the best epoch kept (``best.BestOf``).

    model, result = finetune(student, training_batches(data, 32), teacher=original, config=cfg, eval_fn=ev)

The recipe (optimiser, learning rate, devices, mixed precision) is ``recipe``; the loss per output kind is
``bridge.losses``; data-parallel training under torchrun is ``bridge.distributed``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from ..bridge.losses import CLASS_SCORES, OutputLoss, as_logits, distillation_loss, plan
from ..bridge.torch_graph import OnnxModule, to_torch, write_back
from ..errors import FinetuneError, InputError
from ..options import FinetuneConfig
from .best import BestOf
from .recipe import AMP_DTYPES, augment, cosine_lr, default_lr, optimizer, training_device

if TYPE_CHECKING:
    from ..bridge.distributed import DistContext

__all__ = ["Batch", "FinetuneResult", "finetune"]

Batch = tuple[dict[str, np.ndarray], "np.ndarray | None"]


@dataclass
class FinetuneResult:
    """history: one dict per epoch (epoch, loss, metric, seconds, images, lr); best_epoch is 1-based, 0 when
    the model given was kept (``best.BestOf``); best_metric is the kept model's measure (None without
    eval_fn)."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    bn_stats: str | None = None  # "frozen" / "updated" (None: no BatchNormalization node)
    best_metric: float | None = None
    images_seen: int = 0
    seconds: float = 0.0
    mode: str = "supervised"
    losses: list[OutputLoss] = field(default_factory=list)  # distillation: the loss of each output


class _Teacher:
    """The original model in onnxruntime: ``teacher(feeds) -> {name: array}`` for ``outputs`` (graph outputs
    or, like a feature tensor, any tensor of it)."""

    def __init__(self, model: onnx.ModelProto, outputs: list[str], threads: int | None):
        from ..graph.instrument import with_outputs
        from ..runtime import make_session

        m = with_outputs(model, outputs)
        self.outputs = list(outputs)
        self.session = make_session(m, level="all", threads=threads)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(self.outputs, {k: feeds[k] for k in self.inputs})))


def finetune(
    student: onnx.ModelProto,
    train_batches: Callable[[], Iterable[Batch]],
    *,
    teacher: onnx.ModelProto | None = None,
    config: FinetuneConfig,
    eval_fn: Callable[[onnx.ModelProto], float] | None = None,
    progress: bool = True,
    dist: "DistContext | None" = None,
    distill_outputs: list[str] | None = None,
    keep: BestOf | None = None,
) -> tuple[onnx.ModelProto, FinetuneResult]:
    """Fine-tune ``student`` and return (a copy of it holding the best weights, FinetuneResult).

    train_batches() returns a fresh iterable per epoch of (inputs by graph-input name, labels (N,) int
    or None) (``epochs.training_batches``). The first graph output is taken as the logits (N, classes) [or
    (N, ..., classes)]. eval_fn(model) -> metric (higher is better) is called after each epoch; the best
    epoch's weights are returned (without eval_fn, the last epoch's). ``keep``: the best-of to offer each
    epoch to, seeded with the model given and its measure (``best.BestOf(student, eval_fn(student))``): the
    model given is returned (best_epoch 0) when no epoch beats it. Any failure raises FinetuneError (one line).

    dist (bridge.distributed.DistContext): data-parallel training, this process being one rank.
    train_batches then yields this rank's shard (``training_batches(..., dist=ctx)``); the student is wrapped
    in DistributedDataParallel on ``dist.device`` (config.device is not used); eval_fn and the progress
    bar run on rank 0 only. Every rank returns the trained model; only rank 0's best-epoch choice is
    meaningful. A failure or interruption on any rank stops every rank at the same step (see
    ``bridge.distributed``).

    Distillation (``teacher`` given, batches without labels) compares every float output of the teacher
    with the student's, each with the loss of its kind (``bridge.losses``), summed; ``distill_outputs``
    restricts it to these outputs (a decoder LLM: its logits, not its KV caches).
    """
    if dist is None:
        training_device(config)  # InputError before any work
    module = to_torch(student)  # UnsupportedOperatorError passes through unchanged
    old_threads = torch.get_num_threads()
    finished = False
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        if dist is not None and not dist.is_main:
            eval_fn, progress = None, False
        trainer = _Trainer(module, student, teacher, config, dist, distill_outputs)
        out = trainer.run(train_batches, eval_fn, progress, BestOf() if keep is None else keep)
        if dist is not None:
            dist.vote()  # every rank finished (rank 0's last evaluation included)
        finished = True
        return out
    except FinetuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one FinetuneError line
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise FinetuneError(f"fine-tuning failed: {type(exc).__name__}: {msg[:300]}") from exc
    finally:
        if dist is not None and not finished:
            dist.abort()  # the other ranks stop at their next vote
        torch.set_num_threads(old_threads)


class _Trainer:
    """One fine-tuning run's state: the module on its device, optimiser, loss plan, step count."""

    def __init__(self, module: OnnxModule, student: onnx.ModelProto, teacher, config: FinetuneConfig, dist,
                 distill_outputs):
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed if dist is None else [config.seed, dist.rank])
        self.device = device = torch.device(config.device) if dist is None else dist.device
        self.module, self.student, self.teacher, self.config, self.dist = module, student, teacher, config, dist
        module.to(device)
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise FinetuneError("the model has no trainable weights")
        self.lr = config.lr if config.lr is not None else default_lr(student, config.optimizer)
        self.opt = optimizer(self.params, self.lr, config)
        self.logits_name = module.output_names[0]
        self.feature = config.feature if config.feature_mse > 0 else None
        # what the forward computes: the first output (supervised) or every float output (distillation); the
        # same list on every rank, so DDP sees the same used parameters
        self.specs = plan(teacher, outputs=distill_outputs, task=getattr(config, "task", None),
                          overrides=tuple(getattr(config, "output_kind", ()) or ())) if teacher is not None else []
        if teacher is not None and not self.specs:
            raise FinetuneError("the teacher has no float output to distil")
        self.want = list(dict.fromkeys([self.logits_name] + [spec.name for spec in self.specs]
                                       + ([self.feature] if self.feature else [])))
        # supervised: the first output, read by its log when it is already a softmax
        first = next(iter(self.specs or plan(student)), None)
        self.logits_form = first.form if first is not None and first.name == self.logits_name and \
            first.kind == CLASS_SCORES else "logits"
        self.forward = module.forward_named if dist is None else dist.wrap(module, self.want)
        self.amp = AMP_DTYPES.get(config.amp) if config.amp else None
        if self.amp is torch.float16 and device.type != "cuda":
            raise InputError("--amp fp16 needs a CUDA device (--device cuda); on the CPU use --amp bf16")
        self.scaler = torch.amp.GradScaler(device.type) if self.amp is torch.float16 else None
        self.t_session: _Teacher | None = None
        self.total_steps: int | None = config.max_steps
        self.step = 0
        self.result = FinetuneResult(losses=self.specs)

    def spent(self) -> bool:
        """The step budget (``config.max_steps``) is used up."""
        return self.config.max_steps is not None and self.step >= self.config.max_steps

    def run(self, train_batches, eval_fn, progress: bool, keep: BestOf) -> tuple[onnx.ModelProto, FinetuneResult]:
        """Every epoch, each offered to ``keep``; returns (the model kept, the result)."""
        config, result = self.config, self.result
        start = time.perf_counter()
        for epoch in range(1, config.epochs + 1):
            it = train_batches()
            if epoch == 1:
                if hasattr(it, "__len__"):
                    total = len(it) * config.epochs
                    self.total_steps = min(total, config.max_steps or total)
                _set_bn_stats(self.module, self.student, config, it, result)
            written, metric = self.epoch(epoch, it, eval_fn, progress)
            keep.offer(epoch, written, metric)
            if self.spent():
                break
        result.seconds = time.perf_counter() - start
        result.best_epoch, result.best_metric = keep.epoch, keep.metric
        if keep.model is None:  # no epoch at all
            keep.model = write_back(self.module, self.student)
        return keep.model, result

    def epoch(self, epoch: int, it, eval_fn, progress: bool) -> tuple[onnx.ModelProto, float | None]:
        """Train one epoch over ``it``, write the weights back and evaluate: (the model, its measure)."""
        config, dist = self.config, self.dist
        self.module.train()
        t0 = time.perf_counter()
        losses, images = [], 0
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(it, desc=f"fine-tune epoch {epoch}/{config.epochs}", leave=False,
                       total=len(it) if hasattr(it, "__len__") else None)
            it = bar
        if dist is not None:
            it = dist.lockstep(it, self.spent)
        inputs = None
        for feeds, labels in it:
            if self.spent():
                break
            loss, inputs = self.train_step(epoch, feeds, labels)
            if loss is None:
                break  # a rank ran out of batches: all end the epoch here
            images += next(iter(feeds.values())).shape[0]
            losses.append(loss)
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if bar is not None:
            bar.close()
        if dist is not None:
            dist.average_buffers(self.module)
        self.module.eval()
        written = write_back(self.module, self.student)
        metric = float(eval_fn(written)) if eval_fn is not None else None
        if metric is not None and not math.isfinite(metric):  # a NaN fidelity is a failed fine-tune
            where = self.module.first_nonfinite(inputs, self.want) if losses else None
            raise FinetuneError(f"fine-tuning diverged in epoch {epoch}: the evaluation is {metric}"
                                + (f"; first non-finite: {where}" if where else ""))
        self.result.history.append({"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
                                    "metric": metric, "seconds": time.perf_counter() - t0, "images": images,
                                    "lr": self.opt.param_groups[0]["lr"]})
        self.result.images_seen += images
        return written, metric

    def train_step(self, epoch: int, feeds: dict[str, np.ndarray], labels) -> tuple[float | None, dict]:
        """One optimiser step on a batch: (its loss, the torch inputs); loss None when the ranks end the epoch
        here (one ran out of batches)."""
        config, dist, device = self.config, self.dist, self.device
        if config.augment:
            feeds = {k: augment(v, self.rng) if v.ndim == 4 and v.dtype.kind == "f" else v for k, v in feeds.items()}
        mode = "supervised" if labels is not None else "distillation"
        self.result.mode = mode
        t_out = self.teacher_outputs(feeds) if mode == "distillation" else None
        inputs = {k: torch.as_tensor(v).to(device) for k, v in feeds.items()}
        if self.total_steps:
            for g in self.opt.param_groups:
                g["lr"] = cosine_lr(self.lr, self.step, self.total_steps)
        # ranks agree before DDP's forward (which may hold a collective) and again before backward's
        # all-reduce: each vote raises on every rank if one failed or was interrupted since the last
        if dist is not None and dist.vote():
            return None, inputs
        with torch.autocast(device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            out = self.forward(inputs, self.want)
        loss = self.loss(out, labels, t_out)
        if not torch.isfinite(loss):
            where = _nonfinite_source(self.module, inputs, self.want, t_out)
            raise FinetuneError(f"non-finite loss at epoch {epoch}, step {self.step + 1}: {where}")
        if dist is not None:
            dist.vote()
        self.backward(epoch, loss)
        self.step += 1
        return float(loss.detach()), inputs

    def teacher_outputs(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The teacher's outputs for ``feeds`` (its onnxruntime session made at the first batch)."""
        if self.teacher is None:
            raise FinetuneError("batches carry no labels and no teacher model was given")
        if self.t_session is None:
            self.t_session = _Teacher(self.teacher, [spec.name for spec in self.specs]
                                      + ([self.feature] if self.feature else []), self.config.threads)
        return self.t_session(feeds)

    def loss(self, out: dict[str, torch.Tensor], labels, t_out: dict | None) -> torch.Tensor:
        """Cross-entropy on the first output with labels, else the distillation loss (+ the feature MSE)."""
        if t_out is None:
            logits = as_logits(out[self.logits_name].float(), self.logits_form)  # the loss in float32
            y = torch.as_tensor(labels).to(self.device).long()
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        t_vals = {k: torch.as_tensor(v).to(self.device) for k, v in t_out.items()}
        loss = distillation_loss(self.specs, out, t_vals, self.config.temperature)
        if self.feature:
            loss = loss + self.config.feature_mse * F.mse_loss(out[self.feature].float(),
                                                               t_vals[self.feature].float())
        return loss

    def backward(self, epoch: int, loss: torch.Tensor) -> None:
        """Backward, clip (``config.clip_grad_norm``, default 1), optimiser step (fp16: through the scaler)."""
        opt, scaler = self.opt, self.scaler
        opt.zero_grad(set_to_none=True)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(opt)  # clip the true gradients
        clip = self.config.clip_grad_norm if self.config.clip_grad_norm is not None else 1.0
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip or float("inf"))  # no clip: the norm only
        if scaler is None and not torch.isfinite(norm):  # fp16's scaler skips such steps by itself
            raise FinetuneError(f"non-finite gradient at epoch {epoch}, step {self.step + 1}: "
                                f"{self.module.first_nonfinite_grad() or 'a gradient overflowed'}")
        if scaler is not None:
            scaler.step(opt)  # skipped when the scaled gradients overflowed
            scaler.update()
        else:
            opt.step()


def _nonfinite_source(module: OnnxModule, inputs, want, teacher: dict | None) -> str:
    """Why a loss is not finite, in one phrase: the first non-finite tensor of the student's forward pass
    (``OnnxModule.first_nonfinite``), else a non-finite teacher output, else the loss itself."""
    where = module.first_nonfinite(inputs, want)
    if where:
        return f"first non-finite {where}"
    for name, value in (teacher or {}).items():
        arr = np.asarray(value)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return f"the teacher's output {name!r} is not finite"
    return "every tensor of the forward pass is finite: the loss itself overflowed"


def _set_bn_stats(module: OnnxModule, student: onnx.ModelProto, config: FinetuneConfig, epoch, result) -> None:
    """Freeze or not the BatchNormalization running statistics (``config.freezes_bn``) for the whole run,
    from the number of training samples: the epoch's ``n_samples`` when it has one, else len() batches of
    ``config.batch_size`` (an upper bound), else unknown (frozen unless ``bn_stats="update"``)."""
    if not any(n.op_type == "BatchNormalization" for n in student.graph.node):
        return
    n = getattr(epoch, "n_samples", None)
    if n is None and hasattr(epoch, "__len__"):
        n = len(epoch) * config.batch_size
    module.bn_stats_frozen = config.freezes_bn(n)
    result.bn_stats = "frozen" if module.bn_stats_frozen else "updated"
