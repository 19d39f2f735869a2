"""The argument parser of `onnx-cprune`. The prune and finetune options are generated from the option
dataclasses (``onnx_consensus.options``): their flags, defaults and help are written there once."""
from __future__ import annotations

import argparse

from .. import __version__
from ..options import (FINETUNE_GROUP, GROUPS, CriterionOptions, DataOptions, FinetuneConfig, OutputOptions,
                       RunOptions, add_arguments)

COMMANDS = ("prune", "finetune", "inspect", "bench")


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v.strip()) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _add_debug(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")


def _add_common(p: argparse.ArgumentParser, extra: tuple[str, ...] = ()) -> None:
    """--input-shape, -q, the RunOptions fields ``extra`` and --debug, as the prune command has them."""
    add_arguments(p, [RunOptions], only=("input_shapes", "progress", *extra))
    _add_debug(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnx-cprune",
        description="Depth-prune an ONNX model: remove whole residual blocks chosen by the Consensus criterion.",
        epilog="`onnx-cprune in.onnx out.onnx --calib data/` is short for `onnx-cprune prune ...`.")
    parser.add_argument("--version", action="version", version=f"onnx-consensus {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{prune,finetune,inspect,bench}")

    p = sub.add_parser("prune", help="score and remove residual blocks, write the pruned model")
    p.add_argument("input", help="the ONNX model to prune (never modified)")
    p.add_argument("output", help="where to write the pruned model")
    groups = {"input data": p.add_argument_group("input data")}
    groups["input data"].add_argument("--calib", required=True, metavar="DIR",
                                      help="calibration data: .npy/.npz files or images; for a decoder LLM (KV cache), "
                                      "text: .txt, .jsonl or a folder of them")
    add_arguments(p, GROUPS, groups)
    _add_debug(p)

    p = sub.add_parser("finetune", help="fine-tune an ONNX model (e.g. a pruned one) through the PyTorch bridge",
                       description="Fine-tune any ONNX model through the PyTorch bridge: supervised when the "
                       "training data has labels.npy, else distillation from --teacher; the same recipe and "
                       "flags as `prune --finetune-*`. Writes the same graph with new weights (atomically). "
                       "Under `torchrun --nproc_per_node N -m onnx_consensus finetune ...` it trains data-"
                       "parallel (--ft-batch-size is the global batch); only rank 0 evaluates, prints and writes.")
    p.add_argument("input", help="the ONNX model to fine-tune (never modified)")
    p.add_argument("output", help="where to write the fine-tuned model")
    groups = {"input data": p.add_argument_group("input data"), FINETUNE_GROUP: p.add_argument_group(FINETUNE_GROUP)}
    groups["input data"].add_argument("--train", required=True, metavar="DIR",
                                      help="training data (.npy/.npz files or images; labels.npy: supervised)")
    groups["input data"].add_argument("--eval", metavar="DIR", help="evaluation data: accuracy with labels.npy, "
                                      "else top-1 agreement with --teacher; the best epoch on it is written")
    groups[FINETUNE_GROUP].add_argument("--teacher", metavar="ORIGINAL.onnx",
                                        help="the original model: distillation target without labels, and the "
                                        "reference for agreement and the 'original' metric")
    add_arguments(p, [DataOptions, FinetuneConfig], groups)
    add_arguments(p, [CriterionOptions], groups, only=("feature", "seed"))
    add_arguments(p, [RunOptions], groups, only=("threads", "providers", "progress"))
    add_arguments(p, [OutputOptions], groups, only=("report",))
    for action in p._actions:  # this command always fine-tunes: the dataclass's default, not prune's 0
        if action.dest == "finetune_epochs":
            action.help = f"fine-tune for E epochs (default {FinetuneConfig.epochs})"
    _add_debug(p)

    p = sub.add_parser("inspect", help="list the removable blocks without running the model")
    p.add_argument("input")
    add_arguments(p, [CriterionOptions], only=("unit", "task", "output_kind"))
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_common(p)

    p = sub.add_parser("bench", help="onnxruntime latency of one or more models")
    p.add_argument("models", nargs="+")
    p.add_argument("--batch-sizes", type=_ints, default=(1, 32), help="comma-separated (default 1,32)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads, pinned (default 1)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per model and batch size (default 30)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--spin-wait", action="store_true",
                   help="keep onnxruntime's spin-waiting intra-op threads when alternating several models "
                        "(by default they are off then: an idle session's spinning threads take cores from the "
                        "one being timed)")
    p.add_argument("--data", metavar="DIR", help="take inputs from this data directory (default: random data)")
    p.add_argument("--eval", metavar="DIR", help="also evaluate on this data: top-1 accuracy with labels.npy, "
                   "and agreement with the first model")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_common(p, ("providers",))
    return parser
