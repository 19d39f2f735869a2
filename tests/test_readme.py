"""README.md's quick start command and Python API snippet, extracted from its fenced blocks and run.

A README edit that no longer runs (a renamed flag or function, a moved file) fails here. The budget is
smaller than the README's, and said so in each test; the figures that do not depend on it are checked.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import re
import shlex
import subprocess

import onnx
import pytest

from tests.helpers import CLI, ROOT, env_with_root, installed_entry_point

README = os.path.join(ROOT, "README.md")
BENCHMARKS = os.path.join(ROOT, "docs", "BENCHMARKS.md")
MACS_BEFORE, BLOCK_MACS = 125_747_840, 4_718_592  # the shipped ResNet-56; every removable block costs the same


def fenced_blocks(section: str) -> list[tuple[str, str]]:
    """(language, body) of the fenced code blocks under the README heading ``section`` (up to the next
    heading of the same or a higher level)."""
    text = open(README, encoding="utf-8").read()
    m = re.search(rf"^(#+) {re.escape(section)}\s*$", text, flags=re.M)
    assert m, f"README.md has no heading {section!r}"
    rest = text[m.end():]
    end = re.search(rf"^#{{1,{len(m.group(1))}}} ", rest, flags=re.M)
    return re.findall(r"^```(\w*)\n(.*?)^```", rest[: end.start() if end else None], flags=re.M | re.S)


@pytest.fixture
def in_readme_dir(tmp_path, monkeypatch):
    """A working directory where the README's relative paths (models/, examples/) resolve and its outputs land."""
    for name in ("models", "examples"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _shrink_png_sets(folder, n: int = 256) -> None:
    """Replace ``folder``/examples (a link to the repository's) by a folder of links in which each PNG set
    (``*.png`` + ``labels.npy``) keeps copies of its first ``n`` images and labels (copies: links out of a data
    folder are read only with --follow-symlinks): the quick start's 6,000 training
    and 2,000 test images take a minute to read, train on and evaluate on 2 cores."""
    import numpy as np

    src, dst = os.path.join(ROOT, "examples"), folder / "examples"
    os.unlink(dst)
    dst.mkdir()
    for name in sorted(os.listdir(src)):
        files = sorted(os.listdir(os.path.join(src, name))) if os.path.isdir(os.path.join(src, name)) else []
        pngs = [f for f in files if f.endswith(".png")]
        if not pngs or "labels.npy" not in files:
            os.symlink(os.path.join(src, name), dst / name)
            continue
        (dst / name).mkdir()
        for f in pngs[:n]:
            shutil.copyfile(os.path.join(src, name, f), dst / name / f)
        np.save(dst / name / "labels.npy", np.load(os.path.join(src, name, "labels.npy"))[:n])


def test_quick_start_command(in_readme_dir):
    """The quick start's `onnx-cprune` command, run by the installed entry point (else `python -m`), with
    `--max-samples 32 --schedule one-shot --no-latency` (and `--ft-max-steps 2` when it fine-tunes) appended,
    and its PNG training and test sets cut to their first 64 images: the README's 10 iterative rounds on 128
    images and its fine-tuning take minutes on 2 cores. Which 10 blocks go depends on that; the MACs do not
    (all blocks are equal)."""
    _shrink_png_sets(in_readme_dir)
    bash = [body for lang, body in fenced_blocks("Quick start") if lang == "bash" and "onnx-cprune" in body]
    assert bash, "no bash block with onnx-cprune under Quick start"
    steps = [shlex.split(s) for s in bash[0].split("&&")]
    assert ["pip", "install", "-e", "."] in steps[:-1] and all(s[0] == "pip" for s in steps[:-1])  # not run here
    cmd = steps[-1]
    assert cmd[0] == "onnx-cprune"
    exe = installed_entry_point("onnx-cprune")
    args = list(cmd[1:])
    for flag in ("--train", "--eval"):  # the README's 6,000 / 2,000 images: the first 64 of each here
        if flag in args:
            i = args.index(flag) + 1
            args[i] = _first_images(in_readme_dir / args[i], in_readme_dir / f"small{flag[1:]}", 64)
    argv = ([exe] if exe else CLI) + args + ["--max-samples", "32", "--schedule", "one-shot", "--no-latency"]
    if "--finetune-epochs" in cmd:  # the README's epochs: a few steps here
        argv += ["--ft-max-steps", "2"]
    p = subprocess.run(argv, capture_output=True, text=True, env=env_with_root(), cwd=in_readme_dir)
    assert p.returncode == 0, p.stderr
    if "--finetune-epochs" in cmd and "--eval" in cmd:  # the summary line README's quick start quotes
        assert re.search(r"The written model: eval accuracy \d+\.\d+% against the original's \d+\.\d+% "
                         r"\([+-]\d+\.\d+ pp\) with 37\.5% fewer MACs", p.stdout + p.stderr), p.stdout
    out, report_path = cmd[2], cmd[cmd.index("--report") + 1]
    onnx.checker.check_model(str(in_readme_dir / out), full_check=True)
    report = json.loads((in_readme_dir / report_path).read_text())
    removed = int(cmd[cmd.index("--remove") + 1])
    assert removed == 10 and len(report["removed_ids"]) == removed and len(report["rounds"][0]["blocks"]) == 25
    assert report["macs"]["before"] == MACS_BEFORE
    assert report["macs"]["after"] == MACS_BEFORE - removed * BLOCK_MACS == 78_561_920  # the BENCHMARKS table row
    assert "78,561,920 (-37.52%)" in open(BENCHMARKS, encoding="utf-8").read()  # that table lives there


def _first_images(src, dst, n: int) -> str:
    """A folder with the first ``n`` images of the image folder ``src`` (copied) and their labels.npy."""
    import numpy as np

    os.makedirs(dst)
    names = sorted(f for f in os.listdir(src) if f.endswith(".png"))[:n]
    for f in names:
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))
    labels = os.path.join(src, "labels.npy")
    if os.path.exists(labels):
        np.save(os.path.join(dst, "labels.npy"), np.load(labels)[:n])
    return str(dst)


def test_python_api_snippet(in_readme_dir, monkeypatch):
    """The Python API snippet, executed as written; the test shrinks its budget by wrapping two functions
    the snippet imports: load_calibration keeps 64 samples, prune defaults to the one-shot schedule and no
    latency measurement.
    What its comments promise is checked (the count printed, the file written)."""
    import onnx_consensus as oc

    blocks = [body for lang, body in fenced_blocks("Python API") if lang == "python"]
    assert len(blocks) == 1
    snippet = blocks[0]
    real_load, real_prune = oc.load_calibration, oc.prune

    def small_load(*a, **kw):
        kw.setdefault("max_samples", 64)
        return real_load(*a, **kw)

    def one_shot_prune(*a, **kw):
        kw.setdefault("criterion", oc.CriterionOptions(schedule="one-shot"))
        kw.setdefault("output", oc.OutputOptions(latency=False))
        return real_prune(*a, **kw)

    monkeypatch.setattr(oc, "load_calibration", small_load)
    monkeypatch.setattr(oc, "prune", one_shot_prune)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "README.md (Python API)", "exec"), {"__name__": "readme_snippet"})
    promised = re.search(r"print\(.*#\s*(\d+) removable blocks", snippet)
    lines = printed.getvalue().splitlines()
    assert promised and lines[0].split() == [promised.group(1)]
    if len(lines) > 1:  # the snippet's second print: the removed ids and the report's MACs
        removed_ids = re.findall(r"'([^']+)'", lines[1].split("]")[0])
        assert len(removed_ids) == int(re.search(r"TargetOptions\(remove=(\d+)\)", snippet).group(1))
        assert "78561920" in lines[1].replace(",", "").replace(" ", "").replace("_", "")
    saved = re.search(r"onnx\.save\(result\.model, \"([^\"]+)\"\)", snippet).group(1)
    pruned = onnx.load(in_readme_dir / saved)
    onnx.checker.check_model(pruned, full_check=True)
    removed = int(re.search(r"TargetOptions\(remove=(\d+)\)", snippet).group(1))
    assert len(oc.find_blocks(pruned).blocks) == int(promised.group(1)) - removed
