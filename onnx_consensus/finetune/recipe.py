"""The fine-tuning recipe: optimiser, learning rate and its schedule, device and mixed precision, augmentation.

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

import numpy as np
import onnx
import torch

from ..errors import FinetuneError, InputError
from ..options import FinetuneConfig

__all__ = ["AMP_DTYPES", "augment", "cosine_lr", "default_lr", "optimizer", "training_device"]


def default_lr(model: onnx.ModelProto, optimizer: str) -> float:
    has_bn = any(n.op_type == "BatchNormalization" for n in model.graph.node)
    if optimizer == "adamw":
        return 3e-4 if has_bn else 1e-4
    return 0.01 if has_bn else 0.002


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
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


def optimizer(params: list, lr: float, config: FinetuneConfig) -> torch.optim.Optimizer:
    """The recipe's optimiser over ``params`` at learning rate ``lr``: SGD (Nesterov momentum 0.9) or AdamW,
    weight decay ``config.weight_decay`` (default 0)."""
    wd = config.weight_decay if config.weight_decay is not None else 0.0
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    raise FinetuneError(f"unknown optimizer {config.optimizer!r} (sgd or adamw)")


def cosine_lr(lr: float, step: int, total_steps: int) -> float:
    """The learning rate at ``step`` of ``total_steps``: cosine decay from ``lr`` to zero."""
    return 0.5 * lr * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
