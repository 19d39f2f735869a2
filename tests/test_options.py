"""Options are defined once: every dataclass field has a flag, flags parse back into the dataclasses, the
defaults are the dataclasses' own, and README's options table lists every flag."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from onnx_consensus.cli.parser import build_parser
from onnx_consensus.options import GROUPS, FinetuneConfig, Options, RunOptions, dest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a non-default value for every flag of `prune`: (command-line tokens, expected field value)
SAMPLES = {
    "labels": (["--labels", "l.npy"], "l.npy"),
    "max_samples": (["--max-samples", "7"], 7),
    "image_size": (["--image-size", "20x24"], (20, 24)),
    "mean": (["--mean", "0.5,0.25"], (0.5, 0.25)),
    "std": (["--std", "2"], (2.0,)),
    "layout": (["--layout", "NHWC"], "NHWC"),
    "strict": (["--strict"], True),
    "follow_symlinks": (["--follow-symlinks"], True),
    "seq_len": (["--seq-len", "64"], 64),
    "tokenizer": (["--tokenizer", "t.json"], "t.json"),
    "batch_size": (["--batch-size", "5"], 5),
    "holdout": (["--holdout", "0.3"], 0.3),
    "max_memory": (["--max-memory", "1.5G"], int(1.5 * 2**30)),
    "threads": (["--threads", "3"], 3),
    "quiet": (["-q"], False),
    "input_shape": (["--input-shape", "x:1x2", "--input-shape", "y:3"], {"x": (1, 2), "y": (3,)}),
    "remove": (["--remove", "4"], 4),
    "target_flops": (["--target-flops", "0.4"], 0.4),
    "min_agreement": (["--min-agreement", "0.9"], 0.9),
    "keep_per_stage": (["--keep-per-stage", "2"], 2),
    "only": (["--only", "a,b"], ("a", "b")),
    "exclude": (["--exclude", "c"], ("c",)),
    "plan": (["--plan", "PLAN"], ("b1", "b2")),
    "metrics": (["--metrics", "cka,wasserstein"], ("cka", "wasserstein")),
    "weights": (["--weights", "cka=2,wasserstein=0.5"], {"cka": 2.0, "wasserstein": 0.5}),
    "rescore_top": (["--rescore-top", "4"], 4),
    "prescreen": (["--prescreen", "0"], 0),
    "scope": (["--scope", "local"], "local"),
    "schedule": (["--schedule", "one-shot"], "one-shot"),
    "feature": (["--feature", "f"], "f"),
    "pca_dim": (["--pca-dim", "9"], 9),
    "seed": (["--seed", "11"], 11),
    "unit": (["--unit", "layer"], "layer"),
    "token_mask": (["--token-mask", "mask:pad"], ("mask:pad",)),
    "task": (["--task", "embed"], "embed"),
    "output_kind": (["--output-kind", "out0=yolov8:80", "--output-kind", "map=db"], ("out0=yolov8:80", "map=db")),
    "fidelity": (["--fidelity", "mymod:score"], "mymod:score"),
    "finetune_epochs": (["--finetune-epochs", "2"], 2),
    "lr": (["--lr", "0.1"], 0.1),
    "ft_batch_size": (["--ft-batch-size", "8"], 8),
    "optimizer": (["--optimizer", "adamw"], "adamw"),
    "weight_decay": (["--weight-decay", "0.01"], 0.01),
    "temperature": (["--temperature", "2"], 2.0),
    "feature_mse": (["--feature-mse", "0.5"], 0.5),
    "augment": (["--augment"], True),
    "device": (["--device", "cuda"], "cuda"),
    "ft_max_steps": (["--ft-max-steps", "6"], 6),
    "clip_grad_norm": (["--clip-grad-norm", "0"], 0.0),
    "bn_stats": (["--bn-stats", "update"], "update"),
    "train": (["--train", "t/"], "t/"),
    "eval": (["--eval", "e/"], "e/"),
    "finetune_between": (["--finetune-between", "3"], 3),
    "report": (["--report", "r.json"], "r.json"),
    "force_write": (["--force-write"], True),
    "keep_partial": (["--keep-partial"], True),
    "no_latency": (["--no-latency"], False),
    "latency_runs": (["--latency-runs", "4"], 4),
    "quantize": (["--quantize", "fp16"], "fp16"),
    "target_latency": (["--target-latency", "0.6"], 0.6),
    "target_latency_ms": (["--target-latency-ms", "2.5"], 2.5),
    "latency_choice": (["--latency-choice", "macs"], "macs"),
    "providers": (["--providers", "cuda,cpu"], ("cuda", "cpu")),
    "amp": (["--amp", "bf16"], "bf16"),
}


def _prune_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["prune"]


def _option_flags(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")}


def _fields():
    for cls in GROUPS:
        for f in dataclasses.fields(cls):
            yield cls, f


def test_every_field_has_a_flag():
    flags = _option_flags(_prune_parser())
    for cls, f in _fields():
        meta = f.metadata.get("cli")
        assert meta is not None, f"{cls.__name__}.{f.name} has no command-line flag"
        assert (meta["same_as"] or meta["flag"]) in flags, (cls.__name__, f.name)
    # and every flag is some field's (besides the positional-like --calib and --debug)
    own = {m["flag"] for cls in GROUPS for _, m in cls.cli_fields() if m["same_as"] is None}
    assert flags - own - {"-q"} == {"--calib", "--debug"}


def test_flags_round_trip_into_the_dataclasses(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"removed_ids": ["b1", "b2"]}))
    parser = _prune_parser()
    own = {dest(m["flag"]) for cls in GROUPS for _, m in cls.cli_fields() if m["same_as"] is None}
    assert own == set(SAMPLES), "a new flag needs a sample value here"
    for cls, f in _fields():
        meta = f.metadata["cli"]
        name = dest(meta["same_as"] or meta["flag"])
        tokens, want = SAMPLES[name]
        tokens = [str(plan) if t == "PLAN" else t for t in tokens]
        ns = parser.parse_args(["in.onnx", "out.onnx", "--calib", "c", *tokens])
        got = getattr(cls.from_args(ns), f.name)
        assert got == want, (cls.__name__, f.name, got, want)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if meta["cli_default"] is not dataclasses.MISSING:
            default = meta["cli_default"]
        assert got != default, f.name  # the sample shows the flag does something


def test_defaults_are_the_dataclasses():
    ns = _prune_parser().parse_args(["in.onnx", "out.onnx", "--calib", "c"])
    options = Options.from_args(ns)
    api = Options()
    # the two deliberate differences: progress bars on the command line, no fine-tuning unless asked
    assert options.run == dataclasses.replace(api.run, progress=True)
    assert options.finetune == FinetuneConfig(epochs=0) and api.finetune is None
    for part in ("data", "target", "criterion", "recovery", "output"):
        assert getattr(options, part) == getattr(api, part), part
    assert Options().to_flags() == dict(options.to_flags(), quiet=True)


def test_shared_flags_fill_both_groups():
    ns = _prune_parser().parse_args(["i", "o", "--calib", "c", "--seed", "5", "--threads", "2", "--feature", "t"])
    options = Options.from_args(ns)
    assert (options.criterion.seed, options.finetune.seed) == (5, 5)
    assert (options.run.threads, options.finetune.threads) == (2, 2)
    assert (options.criterion.feature, options.finetune.feature) == ("t", "t")


def test_readme_options_table_lists_every_flag():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    table = text.split("### Options", 1)[1].split("\n###", 1)[0]
    listed = set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", table))
    missing = _option_flags(_prune_parser()) - listed
    assert not missing, f"README's options table lacks {sorted(missing)}"


def test_help_shows_each_default_once():
    text = _prune_parser().format_help()
    assert "inference batch size (default 64)" in " ".join(text.split())
    assert text.count("(default 0.99)") == 1


def test_bad_converted_value_is_one_line(capsys):
    from onnx_consensus.cli import main

    assert main(["prune", "m.onnx", "o.onnx", "--calib", "c", "--image-size", "12"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "onnx-cprune: error: --image-size must look like 224x224, got '12'"


@pytest.mark.parametrize("module", ["onnx_consensus", "onnx_consensus.cli"])
def test_python_m(module):
    p = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and p.stdout.startswith("onnx-consensus "), p.stderr


def test_options_module_is_torch_free():
    code = "import sys, onnx_consensus.options, onnx_consensus.cli.parser; print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.stdout.strip() == "False", p.stderr
    assert RunOptions().progress is False
