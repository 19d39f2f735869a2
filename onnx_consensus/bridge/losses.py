"""Distillation losses chosen per output kind (the output plan, ``kinds.output_plan``), summed over the outputs.

- "class scores" (and "ctc") -> ``kl``: T^2 * KL(softmax(teacher/T) || softmax(student/T)) over the last axis,
  every other axis (batch, time steps of a CTC output) taken as rows. An output that is already a softmax
  (``kinds.outputs.score_forms``: "probabilities") is turned back into logits by its log first (log p is the logits up
  to a per-row constant, which softmax ignores); tempering probabilities themselves would flatten both
  distributions to near uniform (p / 4 differs by at most 0.25 between classes) and leave almost no gradient.
- "embedding" -> ``cosine``: mean over rows of 1 - cos(student, teacher). Chosen over a scaled MSE because
  what consumers of an embedding use is its direction (cosine similarity, nearest neighbours; MiniLM's output is
  L2-normalised, so its norm carries nothing), and the tool's fidelity, hence the choice of the written epoch,
  judges embeddings by the same cosine.
- detector heads (yolov8 / yolov5 / yolov10 tensors, boxes + scores outputs) -> ``detection``: binary
  cross-entropy of the score channels (class probabilities, objectness) against the teacher's probabilities,
  plus ``channel_mse`` of the box channels (and of any other channel, e.g. mask coefficients), so that boxes
  in pixels do not drown the scores; DETR-like logits scores -> ``kl``.
- "text map" (a DB probability map) -> ``bce`` against the teacher's probabilities.
- anything else ("generic": regression values, states) -> ``channel_mse``: per channel, mean((student -
  teacher)^2) / var_c(teacher) (the teacher's variance of that channel over the batch and every other axis;
  channel axis as ``kinds.measures.channel_axis``), averaged over channels: no channel dominates by its units,
  and the learning rate does not depend on them. ``relative_mse`` (one variance for the whole tensor) is kept
  for callers that ask for it.

Tensors: student and teacher outputs of the same shape (N, ...), float32; each loss returns a 0-d tensor.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx
import torch
import torch.nn.functional as F

from ..kinds.basic import CLASS_SCORES

TINY = 1e-30  # probabilities are clamped here before their log (float32 keeps it: min normal ~1.2e-38)


@dataclass(frozen=True)
class OutputLoss:
    """The loss for one graph output: ``name``, its ``kind`` (``kinds``), ``loss`` (kl | cosine | channel_mse |
    relative_mse | bce | detection), for class scores ``form`` (logits | probabilities | log-probabilities), for
    detector tensors ``classes`` (0: every channel after the boxes / objectness)."""

    name: str
    kind: str
    loss: str
    form: str = "logits"
    classes: int = 0
    axis: int | None = None  # channel_mse: the channel axis when the graph says (kinds.basic.generic_head)

    def to_json(self) -> dict:
        return {"output": self.name, "kind": self.kind, "loss": self.loss, "form": self.form}


def _loss_for(head, output: str, forms: Mapping[str, str]) -> OutputLoss:
    from ..kinds.detect import YOLO_KINDS

    kind = head.kind
    if kind in YOLO_KINDS:
        return OutputLoss(output, kind, "detection", classes=int(head.arg("classes") or 0))
    if kind == "boxes":  # separate boxes + scores outputs
        if output == head.outputs[0]:
            return OutputLoss(output, "boxes", "channel_mse")
        logits = head.arg("form") == "logits"
        return OutputLoss(output, "scores", "kl" if logits else "bce", "logits" if logits else "probabilities")
    if kind in (CLASS_SCORES, "ctc"):
        return OutputLoss(output, kind, "kl", forms.get(output, "logits"))
    return OutputLoss(output, kind, {"embedding": "cosine", "text map": "bce"}.get(kind, "channel_mse"),
                      axis=head.arg("channel_axis"))


def plan(model: onnx.ModelProto, kinds: Mapping[str, str] | None = None,
         outputs: Sequence[str] | None = None, *, task: str | None = None,
         overrides: Sequence[str] = ()) -> list[OutputLoss]:
    """One OutputLoss per float output of ``model`` (the teacher: the student has the same interface), in graph
    order. ``kinds``: {output: kind} to use instead of the graph's (``kinds.output_plan`` with ``task`` and
    the --output-kind ``overrides``); ``outputs``: only these outputs (e.g. a decoder's logits, not its KV
    caches)."""
    from ..kinds.outputs import score_forms
    from ..kinds import output_plan, plan_from_kinds

    oplan = plan_from_kinds(kinds) if kinds is not None else output_plan(model, task, tuple(overrides))
    forms = score_forms(model, oplan.kinds)
    by_name = {o: _loss_for(h, o, forms) for h in oplan.heads for o in h.outputs}
    names = list(oplan.kinds) if outputs is None else list(outputs)
    return [by_name.get(n, OutputLoss(n, "generic", "channel_mse")) for n in names]


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


def channel_mse(student: torch.Tensor, teacher: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """Mean over channels of mean_c((student - teacher)^2) / var_c(teacher); ``axis`` the channel axis (default
    ``kinds.measures.channel_axis``: last for rank 2-3, 1 for rank >= 4, none below). A channel whose teacher is
    constant falls back to its mean square, then to 1."""
    from ..kinds.measures import channel_axis

    t = teacher.detach()
    axis = channel_axis(t.dim()) if axis is None else axis
    if axis is None:
        return relative_mse(student, t)
    s2 = student.movedim(axis, -1).reshape(-1, student.shape[axis])
    t2 = t.movedim(axis, -1).reshape(-1, t.shape[axis])
    var = t2.var(dim=0, unbiased=False) if len(t2) > 1 else t2.new_zeros(t2.shape[1])
    scale = torch.where(var > 0, var, t2.pow(2).mean(0))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return ((s2 - t2).pow(2).mean(0) / scale).mean()


def bce(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of student probabilities against the teacher's, minus the teacher's own entropy
    (0 when they are equal); values outside [0, 1] (a teacher's logits) are taken through a sigmoid first."""
    t = teacher.detach()
    if bool((t < 0).any() or (t > 1).any()):
        student, t = torch.sigmoid(student), torch.sigmoid(t)
    eps = 1e-6
    s, t = student.clamp(eps, 1 - eps), t.clamp(eps, 1 - eps)
    return (t * (t.log() - s.log()) + (1 - t) * ((1 - t).log() - (1 - s).log())).mean()


def detection(student: torch.Tensor, teacher: torch.Tensor, kind: str, classes: int = 0) -> torch.Tensor:
    """A YOLO tensor's loss: ``bce`` on the score channels (objectness, class probabilities; YOLOv10's score),
    ``channel_mse`` on the boxes and on any other channel (mask coefficients, YOLOv10's class id)."""
    axis = 1 if kind == "yolov8" else -1
    k = student.shape[axis]
    first = 4
    score_end = (5 if kind == "yolov10" else 4 + (1 if kind in ("yolov5", "yolox_raw") else 0) + (classes or k))
    score_end = min(score_end, k)
    part = lambda x, a, b: x.narrow(axis, a, b - a)  # noqa: E731
    loss = channel_mse(part(student, 0, first), part(teacher, 0, first), axis) + \
        bce(part(student, first, score_end), part(teacher, first, score_end))
    if score_end < k:
        loss = loss + channel_mse(part(student, score_end, k), part(teacher, score_end, k), axis)
    return loss


def output_loss(spec: OutputLoss, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The loss ``spec.loss`` between one output's student and teacher values."""
    if spec.loss == "kl":
        return kl(student, teacher, temperature, spec.form)
    if spec.loss == "cosine":
        return cosine(student, teacher)
    if spec.loss == "channel_mse":
        return channel_mse(student, teacher, spec.axis)
    if spec.loss == "bce":
        return bce(student, teacher)
    if spec.loss == "detection":
        return detection(student, teacher, spec.kind, spec.classes)
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
