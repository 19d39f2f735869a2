"""What a fine-tuning run did, as the report's ``finetune`` entry: one dataclass per caller, ``to_json()`` the
entry's dict (the keys the reports have always had).

- ``FinetuneReport``: a block model's run (the ``finetune`` command's core and ``prune --finetune-*``'s);
- ``PruneFinetuneReport``: ``prune --finetune-*`` (adds the hold-out fidelity before fine-tuning; on failure
  the short entry with ``error``);
- ``CommandFinetuneReport``: the ``finetune`` command (adds input, teacher, device, providers, options);
- ``DistillReport``: a decoder LLM's distillation (perplexities instead of the evaluator's measure).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["CommandFinetuneReport", "DistillReport", "FinetuneReport", "PruneFinetuneReport"]

# the entry the `finetune` command stamps into the written model's metadata
STAMP_KEYS = ("mode", "epochs", "train_samples", "metric", "metric_before", "metric_after", "best_epoch", "processes")


@dataclass
class FinetuneReport:
    """mode: supervised / distillation; metric: the measure's name (``evaluator.Evaluator.metric``) and its
    value for the original model, the model given (before) and the model kept (after; None without
    evaluation data); best_epoch 0 when the model given was kept (``best.BestOf``); best_finetuned: the best
    epoch's measure; images_seen: over all processes; history: one dict per epoch (``train.FinetuneResult``);
    losses: the distillation loss of each output (``bridge.losses.OutputLoss.to_json``)."""

    mode: str
    epochs: int
    train_samples: int
    eval: str | None = None
    processes: int = 1
    metric: str = "agreement"
    metric_original: float | None = None
    metric_before: float | None = None
    metric_after: float | None = None
    best_epoch: int = 0
    images_seen: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    best_finetuned: float | None = None
    bn_stats: str | None = None  # "frozen" / "updated" (None: no BatchNormalization node)
    losses: list[dict] = field(default_factory=list)
    eval_samples: int | None = None  # None: no evaluation data

    @property
    def kept(self) -> str:
        """Which model the run returned: "fine-tuned" or "pruned" (no epoch beat the model given)."""
        return "fine-tuned" if self.best_epoch else "pruned"

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in (
            "mode", "epochs", "train_samples", "eval", "processes", "metric_original", "metric_before",
            "metric_after", "best_epoch", "images_seen", "seconds", "history", "metric", "best_finetuned")}
        out.update(kept=self.kept, bn_stats=self.bn_stats, losses=self.losses)
        if self.eval_samples is not None:
            out["eval_samples"] = self.eval_samples
        return out


@dataclass
class PruneFinetuneReport(FinetuneReport):
    """``prune --finetune-*``: holdout_fidelity_pruned is the pruned model's hold-out fidelity
    (``evaluate.Fidelity.to_json``); bn_stats_reason says why the BN statistics were frozen or updated;
    error: why fine-tuning failed (the pruned model is kept)."""

    holdout_fidelity_pruned: dict | None = None
    bn_stats_reason: str | None = None
    error: str | None = None

    def to_json(self) -> dict:
        if self.error is not None:
            return {"mode": self.mode, "epochs": self.epochs, "train_samples": self.train_samples, "eval": self.eval,
                    "holdout_fidelity_pruned": self.holdout_fidelity_pruned, "error": self.error}
        out = super().to_json()
        out["holdout_fidelity_pruned"] = self.holdout_fidelity_pruned
        if self.bn_stats_reason is not None:
            out["bn_stats_reason"] = self.bn_stats_reason
        return out


@dataclass
class CommandFinetuneReport(FinetuneReport):
    """The ``finetune`` command: its input (path, SHA-256), teacher path, device, AMP, onnxruntime providers
    and the fine-tuning flags (``FinetuneConfig.to_flags``)."""

    input: str | None = None
    input_sha256: str | None = None
    teacher: str | None = None
    device: str | None = None
    amp: str | None = None
    providers: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = super().to_json()
        out.update(input=self.input, input_sha256=self.input_sha256, teacher=self.teacher, device=self.device,
                   amp=self.amp, providers=self.providers, options=self.options)
        return out

    def stamp(self) -> dict:
        """The compact entry stamped into the written model's metadata."""
        return {k: getattr(self, k) for k in STAMP_KEYS}


@dataclass
class DistillReport:
    """A decoder's distillation: perplexity on the held-out windows of the model given (before) and of the
    model kept (after); best_epoch 0 when no epoch lowered it (the model given is kept); history as
    ``train.FinetuneResult``'s (its metric: minus the perplexity); error: why it failed (the pruned model is
    kept)."""

    epochs: int
    train_windows: int = 0
    optimizer: str | None = None
    lr: float | None = None
    max_steps: int | None = None
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    best_epoch: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    mode: str = "distillation"
    error: str | None = None

    @property
    def kept(self) -> str:
        return "fine-tuned" if self.best_epoch else "not fine-tuned: no epoch lowered the held-out perplexity"

    def to_json(self) -> dict:
        if self.error is not None:
            return {"mode": self.mode, "epochs": self.epochs, "error": self.error}
        out = {"kept": self.kept, "mode": self.mode}
        out.update((k, v) for k, v in asdict(self).items() if k not in ("mode", "error"))
        return out
