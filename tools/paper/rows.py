"""The reproduction's cached results as rows (``tools.bench.harness.BenchRow``): one dataclass per kind of unit,
whose fields are the keys of its JSON under ``.cache/paper/<config hash>/<kind>/``. Accuracies are fractions
of the test images, times seconds, MACs multiply-accumulates per sample."""
from __future__ import annotations

from dataclasses import dataclass, field

from tools.bench.harness import BenchRow


@dataclass
class OriginalRow(BenchRow):
    """prune/original: the unpruned model."""

    accuracy: float
    macs: int
    params: int


@dataclass
class LevelRow(BenchRow):
    """One cut level of a pruning run: the first ``level`` blocks of its order removed, no training."""

    level: int
    macs: int
    params: int
    macs_cut: float
    accuracy: float


@dataclass
class PruneRow(BenchRow):
    """prune/<criterion>: the removal order to the deepest level, and the levels (empty until measured)."""

    criterion: str
    order: list
    rounds: int
    prune_seconds: float
    threads: int
    levels: list = field(default_factory=list)

    def __post_init__(self):
        self.levels = [LevelRow.of(x) for x in self.levels]

    def level(self, level: int) -> LevelRow:
        return next(x for x in self.levels if x.level == level)


@dataclass
class FinetuneRow(BenchRow):
    """finetune/<unit>: one fine-tune of a pruned model (``mode`` supervised or distillation) on a budget."""

    criterion: str
    level: int
    mode: str
    seed: int
    budget_images: int
    images_seen: int
    finetune_seconds: float
    threads: int
    accuracy: float
    final_loss: float | None


@dataclass
class AttackRow(BenchRow):
    attack: str
    eps: float
    steps: int
    accuracy: float


@dataclass
class RobustnessRow(BenchRow):
    """robustness/<unit>: clean accuracy and under each attack (eps in pixel units, images in [0, 1])."""

    criterion: str
    level: int | None
    mode: str | None
    images: int
    clean: float
    attacks: list = field(default_factory=list)

    def __post_init__(self):
        self.attacks = [AttackRow.of(a) for a in self.attacks]


@dataclass
class LatencyEntry(BenchRow):
    """One model of a latency run: p50 / p90 ms, and the cuts against the original (fractions)."""

    model: str
    macs: int
    macs_cut: float
    median_ms: float
    p90_ms: float
    latency_cut: float
    original_ms_in_pair: float | None = None  # pruned models: the original's p50 timed beside it


@dataclass
class LatencyRow(BenchRow):
    """latency/t<threads>-b<batch>-r<runs>: the original first, then every pruned model."""

    threads: int
    batch_size: int
    runs: int
    opt_level: str
    rows: list = field(default_factory=list)

    def __post_init__(self):
        self.rows = [LatencyEntry.of(r) for r in self.rows]


ROWS: dict[str, type[BenchRow]] = {"prune": PruneRow, "finetune": FinetuneRow, "robustness": RobustnessRow,
                                   "latency": LatencyRow}
"""The row of each kind of result (prune/original is an ``OriginalRow``)."""


def row_class(kind: str, name: str) -> type[BenchRow]:
    return OriginalRow if (kind, name) == ("prune", "original") else ROWS[kind]
