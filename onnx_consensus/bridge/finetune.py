"""Short recovery fine-tuning of a (pruned) ONNX model through the PyTorch bridge.

Recipe (defaults when a FinetuneConfig field is None):

* SGD, momentum 0.9 (Nesterov), cosine decay of the learning rate to zero over the run (its length
  from len() of the first epoch's batches and max_steps; constant lr when neither is known), no warm-up.
* lr 0.01 when the graph has BatchNormalization nodes: BN re-normalises every conv output, so the scale
  of a weight update is absorbed and a fairly large step is safe while the statistics re-adapt to the
  removed blocks.
* lr 0.002 when BN is folded into Conv (no BN nodes): nothing re-normalises activations, a large step
  on a folded conv changes its output scale directly and destabilises the rest of the network.
* AdamW instead: lr 3e-4 (BN graphs) / 1e-4 (others, e.g. LayerNorm transformers).
* gradients clipped to norm 1.0. Distilling a heavily pruned BN-folded ResNet-56 (T^2-scaled KL on
  logits that start far from the teacher's) diverged to a non-finite loss within 5 steps without it;
  supervised runs without it were unstable on short budgets (one epoch of 2,000 images: +34 pp unclipped
  vs +53 pp clipped) though slightly better on longer ones (5,000 images: 85.5% vs 82.1%).
* BatchNormalization running statistics frozen (BN normalises with its stored statistics in train mode,
  its scale and shift still trained) when there are fewer than ``options.BN_FREEZE_BELOW`` (1000) training
  samples, re-estimated from the batches otherwise (``bn_stats`` overrides): re-estimating them from a few
  dozen samples alone ruined a BN detector (see ``options.BN_FREEZE_BELOW``).
* weight decay 0: a regulariser for long training; over one to a few epochs it only shrinks weights
  that are already trained (and in a folded graph shrinks the implicit BN scales).

Supervised cross-entropy on the first output when the batches carry labels (an output that is already
a softmax is taken by its log); otherwise label-free distillation from the teacher on every float output,
the loss chosen by the output's kind and summed (``bridge.losses``: T^2-scaled KL for class scores, 1 -
cosine for embeddings, variance-normalised MSE for detection maps, boxes and other values), plus
``feature_mse`` times the MSE between student and teacher values of the ``feature`` tensor. The teacher
runs in onnxruntime (one session, on the providers of ``runtime.using_providers``).

Devices: ``config.device`` (cpu, cuda, cuda:K; under torchrun the rank's device) and mixed precision
``config.amp``: bf16 or fp16 autocast of the forward pass (weights, optimiser state and loss stay float32;
fp16 with dynamic loss scaling), so the written-back weights are float32 as the graph's.
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

from ..errors import FinetuneError, InputError
from ..options import FinetuneConfig  # noqa: F401  (defined with its command-line flags; re-exported)
from .losses import CLASS_SCORES, OutputLoss, as_logits, distillation_loss, plan
from .torch_graph import OnnxModule, to_torch, write_back

if TYPE_CHECKING:
    from .distributed import DistContext

Batch = tuple[dict[str, np.ndarray], "np.ndarray | None"]


@dataclass
class FinetuneResult:
    """history: one dict per epoch (epoch, loss, metric, seconds, images, lr); best_epoch is 1-based
    (``recover.finetune_pruned`` sets 0 when the pruned model itself is kept); best_metric is None without
    eval_fn."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    bn_stats: str | None = None  # "frozen" / "updated" (None: no BatchNormalization node)
    best_metric: float | None = None
    images_seen: int = 0
    seconds: float = 0.0
    mode: str = "supervised"
    losses: list[OutputLoss] = field(default_factory=list)  # distillation: the loss of each output


def default_lr(model: onnx.ModelProto, optimizer: str) -> float:
    has_bn = any(n.op_type == "BatchNormalization" for n in model.graph.node)
    if optimizer == "adamw":
        return 3e-4 if has_bn else 1e-4
    return 0.01 if has_bn else 0.002


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random crop with 4-pixel zero padding and horizontal flip, per sample, of an NCHW batch."""
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (4, 4), (4, 4)))
    dy = rng.integers(0, 9, n)
    dx = rng.integers(0, 9, n)
    flip = rng.random(n) < 0.5
    out = np.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop[:, :, ::-1] if flip[i] else crop
    return out


class _Teacher:
    """The original model in onnxruntime: ``teacher(feeds) -> {name: array}`` for ``outputs`` (graph outputs
    or, like a feature tensor, any tensor of it)."""

    def __init__(self, model: onnx.ModelProto, outputs: list[str], threads: int | None):
        from ..runtime import make_session

        from ..graph.instrument import with_outputs

        m = with_outputs(model, outputs)
        self.outputs = list(outputs)
        self.session = make_session(m, level="all", threads=threads)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(self.outputs, {k: feeds[k] for k in self.inputs})))


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def training_device(config: FinetuneConfig) -> torch.device:
    """The torch device ``config.device`` names, checked with ``config.amp`` against this machine:
    InputError (one line) for an unknown device, CUDA missing or out of range, or a precision the device
    cannot train in (fp16 needs CUDA; bf16 needs CPU or a CUDA device with bf16 support)."""
    try:
        dev = torch.device(config.device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown --device {config.device!r}: use cpu, cuda or cuda:K") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {config.device!r}: the bridge trains on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {config.device}: CUDA is not available to this torch build "
                             f"(torch {torch.__version__}); install a CUDA build of torch or use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {config.device}: this machine has {torch.cuda.device_count()} GPU(s)")
    if config.amp is not None:
        if config.amp not in AMP_DTYPES:
            raise InputError(f"--amp {config.amp!r}: use bf16 or fp16")
        if config.amp == "fp16" and dev.type != "cuda":
            raise InputError("--amp fp16 needs a CUDA device (--device cuda); on the CPU use --amp bf16")
        if config.amp == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise InputError(f"--amp bf16: {torch.cuda.get_device_name(dev)} has no bfloat16 support; use --amp fp16")
    return dev


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
) -> tuple[onnx.ModelProto, FinetuneResult]:
    """Fine-tune ``student`` and return (a copy of it holding the best weights, FinetuneResult).

    train_batches() returns a fresh iterable per epoch of (inputs by graph-input name, labels (N,) int
    or None). The first graph output is taken as the logits (N, classes) [or (N, ..., classes)].
    eval_fn(model) -> metric (higher is better) is called after each epoch; the best epoch's weights are
    returned (without eval_fn, the last epoch's). Any failure raises FinetuneError (one line).

    dist (bridge.distributed.DistContext): data-parallel training, this process being one rank.
    train_batches then yields this rank's shard (``distributed.sharded_batches``); the student is wrapped
    in DistributedDataParallel on ``dist.device`` (config.device is not used); eval_fn and the progress
    bar run on rank 0 only. Every rank returns the trained model; only rank 0's best-epoch choice is
    meaningful. A failure or interruption on any rank stops every rank at the same step (see
    ``distributed``).

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
        out = _finetune(module, student, train_batches, teacher, config, eval_fn, progress, dist, distill_outputs)
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


def _finetune(module: OnnxModule, student, train_batches, teacher, config, eval_fn, progress, dist=None,
              distill_outputs=None):
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed if dist is None else [config.seed, dist.rank])
    device = torch.device(config.device) if dist is None else dist.device
    module.to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise FinetuneError("the model has no trainable weights")
    lr = config.lr if config.lr is not None else default_lr(student, config.optimizer)
    wd = config.weight_decay if config.weight_decay is not None else 0.0
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    elif config.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    else:
        raise FinetuneError(f"unknown optimizer {config.optimizer!r} (sgd or adamw)")
    logits_name = module.output_names[0]
    feature = config.feature if config.feature_mse > 0 else None
    # what the forward computes: the first output (supervised) or every float output (distillation); the
    # same list on every rank, so DDP sees the same used parameters
    specs = plan(teacher, outputs=distill_outputs, task=getattr(config, "task", None),
                 overrides=tuple(getattr(config, "output_kind", ()) or ())) if teacher is not None else []
    if teacher is not None and not specs:
        raise FinetuneError("the teacher has no float output to distil")
    want = list(dict.fromkeys([logits_name] + [spec.name for spec in specs] + ([feature] if feature else [])))
    # supervised: the first output, read by its log when it is already a softmax
    first = next(iter(specs or plan(student)), None)
    logits_form = first.form if first is not None and first.name == logits_name and first.kind == CLASS_SCORES \
        else "logits"
    forward = module.forward_named if dist is None else dist.wrap(module, want)
    amp = AMP_DTYPES.get(config.amp) if config.amp else None
    if amp is torch.float16 and device.type != "cuda":
        raise InputError("--amp fp16 needs a CUDA device (--device cuda); on the CPU use --amp bf16")
    scaler = torch.amp.GradScaler(device.type) if amp is torch.float16 else None
    t_session: _Teacher | None = None

    result = FinetuneResult(losses=specs)
    best_model: onnx.ModelProto | None = None
    total_steps: int | None = config.max_steps
    step = 0
    start = time.perf_counter()
    T = config.temperature
    for epoch in range(1, config.epochs + 1):
        it = train_batches()
        if epoch == 1:
            if hasattr(it, "__len__"):
                total_steps = min(len(it) * config.epochs, config.max_steps or len(it) * config.epochs)
            _set_bn_stats(module, student, config, it, result)
        module.train()
        t0 = time.perf_counter()
        losses, images = [], 0
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(it, desc=f"fine-tune epoch {epoch}/{config.epochs}", leave=False,
                       total=len(it) if hasattr(it, "__len__") else None)
            it = bar
        if dist is not None:
            it = dist.lockstep(it, lambda: config.max_steps is not None and step >= config.max_steps)
        for feeds, labels in it:
            if config.max_steps is not None and step >= config.max_steps:
                break
            if config.augment:
                feeds = {k: _augment(v, rng) if v.ndim == 4 and v.dtype.kind == "f" else v
                         for k, v in feeds.items()}
            mode = "supervised" if labels is not None else "distillation"
            result.mode = mode
            if mode == "distillation":
                if teacher is None:
                    raise FinetuneError("batches carry no labels and no teacher model was given")
                if t_session is None:
                    t_session = _Teacher(teacher, [spec.name for spec in specs] + ([feature] if feature else []),
                                         config.threads)
                t_out = t_session(feeds)
            inputs = {k: torch.as_tensor(v).to(device) for k, v in feeds.items()}
            if total_steps:
                for g in opt.param_groups:
                    g["lr"] = 0.5 * lr * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
            # ranks agree before DDP's forward (which may hold a collective) and again before backward's
            # all-reduce: each vote raises on every rank if one failed or was interrupted since the last
            if dist is not None and dist.vote():
                break  # a rank ran out of batches: all end the epoch here
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                out = forward(inputs, want)
            if mode == "supervised":
                logits = as_logits(out[logits_name].float(), logits_form)  # the loss in float32
                y = torch.as_tensor(labels).to(device).long()
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            else:
                t_vals = {k: torch.as_tensor(v).to(device) for k, v in t_out.items()}
                loss = distillation_loss(specs, out, t_vals, T)
                if feature:
                    loss = loss + config.feature_mse * F.mse_loss(out[feature].float(), t_vals[feature].float())
            if not torch.isfinite(loss):
                raise FinetuneError(f"non-finite loss at epoch {epoch}, step {step + 1}")
            if dist is not None:
                dist.vote()
            opt.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                scaler.unscale_(opt)  # clip the true gradients
            clip = config.clip_grad_norm if config.clip_grad_norm is not None else 1.0
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            if scaler is not None:
                scaler.step(opt)  # skipped when the scaled gradients overflowed
                scaler.update()
            else:
                opt.step()
            step += 1
            n = next(iter(feeds.values())).shape[0]
            images += n
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if bar is not None:
            bar.close()
        if dist is not None:
            dist.average_buffers(module)
        module.eval()
        written = write_back(module, student)
        metric = float(eval_fn(written)) if eval_fn is not None else None
        seconds = time.perf_counter() - t0
        result.history.append({"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
                               "metric": metric, "seconds": seconds, "images": images,
                               "lr": opt.param_groups[0]["lr"]})
        result.images_seen += images
        if eval_fn is None or best_model is None or metric > result.best_metric:
            best_model, result.best_metric, result.best_epoch = written, metric, epoch
        if config.max_steps is not None and step >= config.max_steps:
            break
    result.seconds = time.perf_counter() - start
    if best_model is None:  # no step was taken (empty data or max_steps=0)
        best_model = write_back(module, student)
    return best_model, result


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
