"""Distillation losses chosen per output kind (``graph.heads.output_kinds``), summed over the float outputs.

- "class scores" -> ``kl``: T^2 * KL(softmax(teacher/T) || softmax(student/T)) over the last axis, every other
  axis (batch, time steps of a CTC output) taken as rows. An output that is already a softmax
  (``heads.score_forms``: "probabilities") is turned back into logits by its log first (log p is the logits up
  to a per-row constant, which softmax ignores); tempering probabilities themselves would flatten both
  distributions to near uniform (p / 4 differs by at most 0.25 between classes) and leave almost no gradient.
- "embedding" -> ``cosine``: mean over rows of 1 - cos(student, teacher). Chosen over a scaled MSE because
  what consumers of an embedding use is its direction (cosine similarity, nearest neighbours; MiniLM's output is
  L2-normalised, so its norm carries nothing), and the tool's fidelity, hence the choice of the written epoch,
  judges embeddings by the same cosine.
- anything else ("generic": detection maps and boxes, regression values, states) -> ``relative_mse``:
  mean((student - teacher)^2) / var(teacher), the variance over all elements of the teacher's output in the
  batch: the MSE in units of the output's own spread, so outputs of different scales (a probability map,
  box offsets in pixels) weigh alike when summed and the learning rate does not depend on the units.
  A shift-free scale (variance, not the mean square) so that a large constant offset (coordinates) does not
  hide the errors.

Tensors: student and teacher outputs of the same shape (N, ...), float32; each loss returns a 0-d tensor.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx
import torch
import torch.nn.functional as F

CLASS_SCORES = "class scores"
LOSS_OF_KIND = {CLASS_SCORES: "kl", "embedding": "cosine", "generic": "relative_mse"}
TINY = 1e-30  # probabilities are clamped here before their log (float32 keeps it: min normal ~1.2e-38)


@dataclass(frozen=True)
class OutputLoss:
    """The loss for one graph output: ``name``, its ``kind`` (heads.output_kinds), ``loss`` (kl | cosine |
    relative_mse) and, for class scores, ``form`` (logits | probabilities | log-probabilities)."""

    name: str
    kind: str
    loss: str
    form: str = "logits"

    def to_json(self) -> dict:
        return {"output": self.name, "kind": self.kind, "loss": self.loss, "form": self.form}


def plan(model: onnx.ModelProto, kinds: Mapping[str, str] | None = None,
         outputs: Sequence[str] | None = None) -> list[OutputLoss]:
    """One OutputLoss per float output of ``model`` (the teacher: the student has the same interface), in graph
    order. ``kinds``: {output: kind} to use instead of ``heads.output_kinds(model)``; ``outputs``: only these
    outputs (e.g. a decoder's logits, not its KV caches)."""
    from ..graph.heads import output_kinds, score_forms

    kinds = dict(output_kinds(model) if kinds is None else kinds)
    if outputs is not None:
        kinds = {name: kinds.get(name, "generic") for name in outputs}
    forms = score_forms(model, kinds)
    return [OutputLoss(name, kind, LOSS_OF_KIND.get(kind, "relative_mse"), forms.get(name, "logits"))
            for name, kind in kinds.items()]


def as_logits(scores: torch.Tensor, form: str) -> torch.Tensor:
    """Class scores in ``form`` -> logits (up to a per-row constant) over the last axis."""
    if form == "probabilities":
        return torch.log(scores.clamp_min(TINY))
    return scores


def kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, form: str = "logits") -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), rows = every axis but the last, mean over rows."""
    c = student.shape[-1]
    s = as_logits(student, form).reshape(-1, c) / temperature
    t = as_logits(teacher, form).reshape(-1, c) / temperature
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean",
                    log_target=True) * temperature ** 2


def cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over samples (axis 0) of 1 - cos between the flattened student and teacher values."""
    n = student.shape[0]
    return (1.0 - F.cosine_similarity(student.reshape(n, -1), teacher.reshape(n, -1), dim=1, eps=1e-8)).mean()


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean((student - teacher)^2) / var(teacher) (population variance over all elements; a constant teacher
    falls back to its mean square, then to 1)."""
    t = teacher.detach()
    scale = t.var(unbiased=False) if t.numel() > 1 else t.new_zeros(())
    scale = torch.where(scale > 0, scale, t.pow(2).mean())
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return F.mse_loss(student, t) / scale


def output_loss(spec: OutputLoss, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The loss ``spec.loss`` between one output's student and teacher values."""
    if spec.loss == "kl":
        return kl(student, teacher, temperature, spec.form)
    if spec.loss == "cosine":
        return cosine(student, teacher)
    if spec.loss == "relative_mse":
        return relative_mse(student, teacher)
    raise ValueError(f"unknown distillation loss {spec.loss!r}")


def distillation_loss(specs: list[OutputLoss], student: Mapping[str, torch.Tensor],
                      teacher: Mapping[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """The sum over ``specs`` of each output's loss (student values in float32)."""
    total = None
    for spec in specs:
        part = output_loss(spec, student[spec.name].float(), teacher[spec.name].float(), temperature)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no float output to distil")
    return total
