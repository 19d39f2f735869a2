"""Every option of a prune run, defined once: each dataclass field holds its value's default, and its
``metadata`` the command-line flag, help, type/choices/metavar. The CLI's argument groups are generated
from these classes (``add_arguments``) and parsed back into them (``Options.from_args``); the Python API
takes the same classes. torch-free (the fine-tuning config is plain data).

Flags are added with ``argparse.SUPPRESS`` as their default, so a flag that is not given leaves the
field's own default: no default is written twice. Two fields differ on purpose between the API and the
command (``cli_default``): progress bars (on in the command unless ``-q``) and fine-tuning epochs (0 in the
command unless ``--finetune-epochs``; the API fine-tunes only when given a ``FinetuneConfig``).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import ClassVar, Literal

# the flags' machinery and converters (flags.py), under the names this module's fields use; add_arguments,
# dest, plan_ids, FINETUNE_GROUP and GROUP_TITLES are importable from here as before
from .flags import FINETUNE_GROUP, GROUP_TITLES, add_arguments, dest, option, plan_ids  # noqa: F401
from .flags import Group as _Group
from .flags import csv_list as _csv
from .flags import floats as _floats
from .flags import image_size_hw as _image_size
from .flags import input_shapes as _input_shapes
from .flags import memory_size as _size
from .flags import metric_weights as _weights
from .quantize import FORMATS as QUANTIZE_FORMATS

PAPER_METRICS = ("cka", "gaussian_stochastic_0", "gaussian_stochastic_1", "gaussian_stochastic_2",
                 "permutation", "linear_0", "linear_1", "wasserstein")
"""The eight metrics of the published Consensus, in its order (``--metrics paper``; their registry is
``onnx_consensus.metrics``)."""
DEFAULT_METRICS = PAPER_METRICS
"""The metrics ``score_blocks`` combines when given none (the published eight)."""
DEFAULT_CRITERION = ("output",)
"""The default of ``--metrics`` (names or presets, ``metrics.presets``) when nothing is fine-tuned: the
output-level scores against the original model (``output_kl`` for classifiers, ``output_mse`` +
``output_cosine`` otherwise). Chosen on the criterion benchmark (``tools/bench/criteria.py``; docs/BENCHMARKS.md,
"Choosing the criterion"): the best mean rank without fine-tuning over six models and 13 cut levels (4.00 of 13
criteria, against 5.04 for the best single paper metric and 6.85 for the published Consensus). Decoder LLMs
use it in both conditions (``llm.run``). ``--metrics paper`` is the published Consensus."""
FINETUNED_CRITERION = ("paper+output",)
"""The default of ``--metrics`` when the pruned model is fine-tuned (``--finetune-epochs`` or
``--finetune-between``): the published eight plus the output-level scores, one rank sum. The best mean rank
after the benchmark's distillation budget (4.19 of 13, against 5.38 for the best single metric, 5.50 for
``paper`` and 6.31 for ``output``)."""


def default_criterion(finetuned: bool) -> tuple[str, ...]:
    """``--metrics`` when not given: ``FINETUNED_CRITERION`` if the pruned model is fine-tuned, else
    ``DEFAULT_CRITERION``."""
    return FINETUNED_CRITERION if finetuned else DEFAULT_CRITERION


DECODER_PRESCREEN = 3
"""The default of ``--prescreen`` on decoder LLMs (``llm.staged``): layers rescored by the global criterion per
round, after the Block Influence prescreen. Chosen on the tiny Llama's held-out perplexity and the scale benchmark
(docs/BENCHMARKS.md, "Decoder LLMs at scale")."""


LATENCY_CHOICES = ("damage", "latency", "macs")  # --latency-choice: the trade of latency_target.Budget.pick

# --------------------------------------------------------------------------------------------------
# the option groups

@dataclass
class DataOptions(_Group):
    """How the calibration data is read (see ``data.load_calibration``)."""

    GROUP: ClassVar[str] = "input data"
    labels: str | None = option("--labels", "class ids (.npy) in the data's sorted sample order (default: "
                                "labels.npy in the calibration directory, if present)", default=None,
                                metavar="FILE", decoder="the calibration is text")
    max_samples: int | None = option("--max-samples", "use at most this many calibration samples", default=None,
                                     type=int)
    image_size: tuple[int, int] | None = option("--image-size", "resize images to HxW (default: the model's "
                                                "input size)", default=None, metavar="HxW", convert=_image_size,
                                                decoder="the calibration is text")
    mean: tuple[float, ...] | None = option("--mean", "per-channel mean subtracted from images scaled to [0,1] "
                                            "(default 0)", default=None, type=_floats,
                                            decoder="the calibration is text")
    std: tuple[float, ...] | None = option("--std", "per-channel std dividing images (default 1)", default=None,
                                           type=_floats, decoder="the calibration is text")
    layout: Literal["NCHW", "NHWC"] = option("--layout", "image tensor layout", default="NCHW",
                                             choices=("NCHW", "NHWC"), decoder="the calibration is text")
    strict: bool = option("--strict", "fail on a corrupt data file instead of skipping it", default=False,
                          decoder="the calibration text is read whole")
    follow_symlinks: bool = option("--follow-symlinks", "read files of the calibration, training and evaluation "
                                   "folders (and the tokenizer and configs beside a decoder export) that are "
                                   "symbolic links to places outside their folder (refused by default)",
                                   default=False)
    seq_len: int = option("--seq-len", "decoder LLMs: tokens per calibration window of the text", default=128,
                          type=int)
    tokenizer: str | None = option("--tokenizer", "decoder LLMs: tokenizer.json for the text (default: the one "
                                   "beside the model)", default=None, metavar="FILE")


@dataclass
class RunOptions(_Group):
    """Batching, threads and providers: ``batch_size`` samples per inference batch (lowered to fit
    ``max_memory`` bytes, ``memory.fit_memory``; None: a share of the available memory), ``holdout`` fraction of the
    data kept back for the fidelity check, onnxruntime intra-op ``threads`` (None: its default), ``providers``
    (short names, ``runtime.resolve_providers``) for every onnxruntime session,
    ``input_shapes`` (input name -> shape) fixing dynamic non-batch dims for MAC counting."""

    GROUP: ClassVar[str] = "output"
    batch_size: int = option("--batch-size", "inference batch size", default=64, type=int, group="input data")
    holdout: float = option("--holdout", "fraction of the calibration data kept back for the fidelity check",
                            default=0.2, type=float, group="input data")
    threads: int | None = option("--threads", "onnxruntime intra-op threads (default: all cores)", default=None,
                                 type=int)
    providers: tuple[str, ...] = option(
        "--providers", "onnxruntime execution providers for every session (scoring, fidelity, latency, teacher), "
        "in order of preference: cpu, cuda, cuda:K, tensorrt, ... A provider this onnxruntime lacks is an error, "
        "or a warning and a fallback when an installed one follows it (cuda,cpu); GPUs need pip install "
        "'onnx-consensus[gpu]'", default=("cpu",), type=_csv, metavar="NAME,...")
    progress: bool = option("--quiet", "no progress bars, only the summary", short="-q", default=False,
                            negate=True, cli_default=True)
    max_memory: int | None = option(
        "--max-memory", "memory budget (6G, 512M; bytes in the API): the inference batch is lowered to fit the "
        "peak estimated from the graph before any inference, and a run that cannot fit even at batch 1 is refused "
        "(default: 60%% of the memory available at the start)", default=None, metavar="SIZE", convert=_size,
        group="input data", show_default=False, decoder="the memory estimate covers block models only")
    input_shapes: dict[str, tuple[int, ...]] = option(
        "--input-shape", "fix an input's dynamic dimensions for MAC counting (repeatable)",
        default_factory=dict, metavar="NAME:1x3x224x224", append=True, convert=_input_shapes,
        decoder="MACs are counted per token (onnx-cprune inspect)")


@dataclass
class TargetOptions(_Group):
    """When to stop: ``remove`` blocks, or ``target_flops`` fraction of MACs removed, or (neither) the
    fidelity budget ``min_agreement``; ``plan`` replays removals (block ids, in order) without scoring."""

    GROUP: ClassVar[str] = "target"
    remove: int | None = option("--remove", "remove N blocks", default=None, type=int, metavar="N")
    target_flops: float | None = option("--target-flops", "remove blocks until at least the fraction F of MACs "
                                        "is gone (e.g. 0.5)", default=None, type=float, metavar="F",
                                        decoder="the target is a number of layers (--remove N) or --plan")
    target_latency: float | None = option("--target-latency", "remove blocks until the written model's measured "
                                          "latency (batch 1) is at most the fraction F of the original's (decoder LLMs: "
                                          "the decode time per generated token)",
                                          default=None, type=float, metavar="F")
    target_latency_ms: float | None = option("--target-latency-ms", "... or at most T ms", default=None, type=float)
    latency_choice: str = option("--latency-choice", "latency target: the block each round: damage (least damage), "
                                 "latency or macs (rank / relative cost)", default="damage", choices=LATENCY_CHOICES,
                                 decoder="every decoder layer costs the same time: the least damaging goes")
    min_agreement: float = option("--min-agreement", "with no target: keep removing while the hold-out fidelity "
                                  "stays >= this, in the task's terms (detections kept, top-1 agreement, mask IoU, "
                                  "equal strings, cosine, standardised fidelity: the lowest over the outputs; see "
                                  "--task, --output-kind, --fidelity)", default=0.99, type=float,
                                  decoder="the target is a number of layers (--remove N) or --plan")
    keep_per_stage: int = option("--keep-per-stage", "keep at least K blocks in each run of same-shaped blocks",
                                 default=1, type=int, metavar="K")
    only: tuple[str, ...] = option("--only", "consider only these blocks", default=(), type=_csv, metavar="ID,...")
    exclude: tuple[str, ...] = option("--exclude", "never remove these blocks", default=(), type=_csv,
                                      metavar="ID,...")
    plan: tuple[str, ...] = option("--plan", "replay the removals of an earlier report, no scoring", default=(),
                                   metavar="REPORT.json", convert=plan_ids)


@dataclass
class CriterionOptions(_Group):
    """How blocks are ranked: metric names (the Consensus when several; None: ``default_criterion``, by whether
    the pruned model is fine-tuned), scope, schedule, feature tensor."""

    GROUP: ClassVar[str] = "criterion"
    metrics: tuple[str, ...] | None = option(
        "--metrics", "comma-separated metric names or presets, one rank sum: paper (the published eight), output "
        "(output-level scores vs the original model), paper+output, or names joined by + (default: "
        + "+".join(DEFAULT_CRITERION) + " without fine-tuning, " + "+".join(FINETUNED_CRITERION) + " with "
        "--finetune-epochs or --finetune-between: the best of each condition on the criterion benchmark)",
        default=None, type=_csv, show_default=False)
    weights: dict[str, float] = option("--weights", "weighted rank sum: metric=weight,... (metrics not named "
                                       "weigh 1)", default_factory=dict, type=_weights, metavar="M=W,...",
                                       show_default=False)
    rescore_top: int | None = option("--rescore-top", "iterative schedule: after the first round re-score only "
                                     "the K best candidates of the previous round (default: all)", default=None,
                                     type=int, metavar="K")
    prescreen: int | None = option("--prescreen", "decoder LLMs, global scope: each round rank the layers by "
                                   "Block Influence from the hidden states carried between rounds and score only "
                                   f"the K lowest with --metrics (default {DECODER_PRESCREEN}; 0: every layer, "
                                   "the exact global criterion)", default=None, type=int, metavar="K")
    scope: str = option("--scope", "global: feature tensor with vs without the block; local: block entry vs "
                        "exit", default="global", choices=("global", "local"))
    schedule: str = option("--schedule", "iterative: re-score after each removal; one-shot: score once",
                           default="iterative", choices=("iterative", "one-shot"))
    feature: str | None = option("--feature", "feature tensor (default: the classifier head's input when the "
                                 "graph ends in one after the last block, else the graph's float outputs, "
                                 "pooled)", default=None, metavar="TENSOR",
                                 decoder="layers are scored on the final hidden state or the logits")
    task: str | None = option("--task", "what the model does, when the graph does not say: detect (detector "
                              "heads: detections kept), segment (DB text map: mask IoU), ocr (CTC: equal strings), "
                              "classify (the first output is class scores: top-1 agreement, feature = the last "
                              "Gemm/MatMul/Conv's input), embed (cosine) or generic (per-channel standardised "
                              "fidelity) (default: judged from the graph)", default=None,
                              choices=("detect", "segment", "ocr", "classify", "embed", "generic"),
                              decoder="the outputs are next-token logits, judged by perplexity")
    output_kind: tuple[str, ...] = option(
        "--output-kind", "what one output is, overriding the graph (repeatable): NAME=KIND[:ARGS] with KIND "
        "yolov8[:C] / yolov5[:C] / yolov10 / yolox_raw[:HxW] / boxes[:xyxy|cxcywh] with scores[:probs|sigmoid|logits] "
        "/ db[:THRESHOLD] / ctc[:BLANK] / class / embed / generic", default=(), append=True, metavar="NAME=KIND[:ARGS]",
        convert=tuple, show_default=False, decoder="the outputs are next-token logits, judged by perplexity")
    fidelity: str | None = option("--fidelity", "your own fidelity measure, module:function(original_outputs, "
                                  "pruned_outputs) -> float in [0, 1] (dicts of arrays by output name), used for "
                                  "ranking, the budget, the collapse warning and the summary", default=None,
                                  metavar="MODULE:FUNCTION",
                                  decoder="the outputs are next-token logits, judged by perplexity")
    pca_dim: int = option("--pca-dim", "principal-component cap for alignment metrics", default=256, type=int)
    seed: int = option("--seed", "seed for the hold-out split, random metric, k-means, fine-tuning", default=0,
                       type=int)
    unit: str = option("--unit", "candidate unit: every residual sub-block, or whole transformer layers "
                       "(attention + MLP sub-blocks paired); decoder LLMs: always whole decoder layers",
                       default="block", choices=("block", "layer"))
    token_mask: tuple[str, ...] = option("--token-mask", "input NAME masks tokens for feature averaging: keep = "
                                         "nonzero marks a real token, pad = nonzero marks padding (default: read "
                                         "from the graph, else guessed from the name)", default=(), type=_csv,
                                         metavar="NAME:keep|pad,...", show_default=False,
                                         decoder="the calibration windows hold no padding")


BN_FREEZE_BELOW = 1000
"""Fine-tuning on fewer training samples than this keeps BatchNormalization running statistics frozen by
default. The stored statistics were estimated on the model's own training set (typically 1e4-1e6 samples);
re-estimating them (train mode, an exponential average with ONNX momentum 0.9, i.e. a memory of ~10 batches)
from a few dozen or hundred calibration samples replaces them with noisy estimates of a narrower
distribution: on a BN detector fine-tuned on 32 images this alone cost 12 pp, even at lr 1e-12 (issue 12,
failure 9). From about a thousand samples on, per-channel means and variances are estimated to a few
percent and re-estimating them can adapt the statistics to the removed blocks."""


@dataclass
class FinetuneConfig(_Group):
    """Fine-tuning options; None means "chosen by the recipe" (see ``finetune.recipe``). ``batch_size``
    is the training batch size: ``finetune.epochs`` builds the training batches with it."""

    GROUP: ClassVar[str] = FINETUNE_GROUP
    epochs: int = option("--finetune-epochs", "fine-tune the pruned model for E epochs (0: no fine-tuning)",
                         default=1, type=int, metavar="E", cli_default=0)
    lr: float | None = option("--lr", "peak learning rate (default: 0.01 with BN nodes, 0.002 BN-folded)",
                              default=None, type=float)
    batch_size: int = option("--ft-batch-size", "training batch size (under torchrun the global batch, split "
                                               "evenly over the processes)", default=64, type=int)
    optimizer: Literal["sgd", "adamw"] = option("--optimizer", "sgd (momentum 0.9) or adamw", default="sgd",
                                                choices=("sgd", "adamw"))
    weight_decay: float | None = option("--weight-decay", "weight decay (default 0)", default=None, type=float)
    temperature: float = option("--temperature", "distillation temperature", default=4.0, type=float)
    feature_mse: float = option("--feature-mse", "weight of the feature-tensor MSE in distillation", default=0.0,
                                type=float, show_default=False, decoder="distillation is on the logits")
    feature: str | None = option("--feature", "", default=None, same_as="--feature")
    # what the outputs are, for the distillation loss of each (the prune run's --task / --output-kind)
    task: str | None = option("--task", "", default=None, same_as="--task")
    output_kind: tuple[str, ...] = option("--output-kind", "", default=(), same_as="--output-kind", convert=tuple)
    augment: bool = option("--augment", "random crop and flip for image inputs", default=False,
    decoder="image inputs only")
    seed: int = option("--seed", "", default=0, same_as="--seed")
    device: str = option("--device", "where the PyTorch bridge trains: cpu, cuda or cuda:K (under torchrun each "
                         "rank takes cuda:LOCAL_RANK)", default="cpu")
    amp: Literal["bf16", "fp16"] | None = option("--amp", "mixed precision for the bridge's forward pass: bf16 (CUDA "
                                                 "with bf16 support, or CPU) or fp16 (CUDA, with loss scaling)",
                                                 default=None, choices=("bf16", "fp16"))
    threads: int | None = option("--threads", "", default=None, same_as="--threads")
    max_steps: int | None = option("--ft-max-steps", "stop fine-tuning after this many optimiser steps",
                                   default=None, type=int)
    clip_grad_norm: float | None = option("--clip-grad-norm", "gradient norm clip (default 1.0; 0: off)",
                                          default=None, type=float)
    bn_stats: Literal["freeze", "update"] | None = option(
        "--bn-stats", "BatchNormalization running statistics during fine-tuning: freeze (BN layers normalise with "
        "the stored statistics, their scale and shift still trained) or update (re-estimated from the training "
        f"batches) (default: freeze below {BN_FREEZE_BELOW} training samples, else update)", default=None,
        choices=("freeze", "update"))

    def freezes_bn(self, n_samples: int | None) -> bool:
        """Whether BN running statistics stay frozen when training on ``n_samples`` samples (None: unknown,
        frozen): ``bn_stats`` when set, else frozen below ``BN_FREEZE_BELOW`` samples."""
        if self.bn_stats is not None:
            return self.bn_stats == "freeze"
        return n_samples is None or n_samples < BN_FREEZE_BELOW


@dataclass
class RecoveryOptions(_Group):
    """Where fine-tuning data comes from, and fine-tuning between removals."""

    GROUP: ClassVar[str] = FINETUNE_GROUP
    train: str | None = option("--train", "training data (default: the calibration data; with labels.npy: "
                               "supervised, else distillation from the original model)", default=None,
                               metavar="DIR", decoder="distillation trains on the calibration windows")
    eval: str | None = option("--eval", "evaluation data: accuracy with labels.npy, else agreement; the best "
                              "epoch on it is the one written; decoder LLMs: held-out text for perplexity",
                              default=None, metavar="DIR")
    between: int = option("--finetune-between", "fine-tune N steps after each removal, before re-scoring "
                          "(iterative schedule)", default=0, type=int, metavar="N", show_default=False,
                          decoder="not implemented for decoder layers")


@dataclass
class OutputOptions(_Group):
    """What is written and measured besides the pruned model."""

    GROUP: ClassVar[str] = "output"
    report: str | None = option("--report", "write the JSON report here", default=None, metavar="FILE")
    force_write: bool = option("--force-write", "write the output even when nothing was removed", default=False)
    keep_partial: bool = option("--keep-partial", "if a run fails midway (onnxruntime error, interrupt), still "
                                "write the model with the removals done so far and the report with the scores "
                                "computed so far (exit code stays non-zero)", default=False,
                                decoder="not implemented for decoder runs")
    latency: bool = option("--no-latency", "skip the before/after latency measurement", default=True, negate=True)
    latency_runs: int = option("--latency-runs", "timed runs per model for latency", default=20, type=int)
    quantize: str | None = option("--quantize", "quantize the written model after pruning and fine-tuning: int8 "
                                  "(static QDQ; decoder LLMs: dynamic, MatMul weights), int4 (MatMulNBits) or fp16; "
                                  "four rows compared in the summary",
                                  default=None, choices=QUANTIZE_FORMATS)  # live: formats registered later count


GROUPS = (DataOptions, RunOptions, TargetOptions, CriterionOptions, FinetuneConfig, RecoveryOptions, OutputOptions)
"""Every class whose fields are flags of ``onnx-cprune prune``, in help order."""


@dataclass
class Options:
    """All options of a prune run. ``finetune``: None, or a config with ``epochs`` 0, means no fine-tuning
    after pruning (a between-removals fine-tune, ``recovery.between``, still uses its hyper-parameters)."""

    data: DataOptions = field(default_factory=DataOptions)
    run: RunOptions = field(default_factory=RunOptions)
    target: TargetOptions = field(default_factory=TargetOptions)
    criterion: CriterionOptions = field(default_factory=CriterionOptions)
    finetune: FinetuneConfig | None = None
    recovery: RecoveryOptions = field(default_factory=RecoveryOptions)
    output: OutputOptions = field(default_factory=OutputOptions)

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> Options:
        return cls(data=DataOptions.from_args(ns), run=RunOptions.from_args(ns),
                   target=TargetOptions.from_args(ns), criterion=CriterionOptions.from_args(ns),
                   finetune=FinetuneConfig.from_args(ns), recovery=RecoveryOptions.from_args(ns),
                   output=OutputOptions.from_args(ns))

    def to_flags(self) -> dict:
        """Every option by its flag's dest name, as the report records them."""
        out: dict = {}
        for part in (self.data, self.run, self.target, self.criterion, self.finetune or FinetuneConfig(epochs=0),
                     self.recovery, self.output):
            out.update(part.to_flags())
        out["input_shape"] = [f"{k}:{'x'.join(map(str, v))}" for k, v in out["input_shape"].items()]
        return out
