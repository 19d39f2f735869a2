"""Shared pieces of the paper-reproduction experiment (issue 6): configuration, the result cache, data,
pruned models by criterion and level, and accuracy on the Fashion-MNIST test set.

Every unit of work (one pruning run, one fine-tune, one attack, ...) stores its result as JSON (and a model
as ONNX where later tables need it) under ``.cache/paper/<config hash>/``, keyed by what it depends on, so
an interrupted run resumes where it stopped and a changed budget does not reuse stale results.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from tools.bench.harness import (ROOT, BenchRow, add_shard, cache_dir as harness_cache_dir, config_key, read_json,
                                 shard, write_json)

from .rows import row_class


@dataclass(frozen=True)
class Config:
    """What every table of the experiment shares. Budgets are in training images seen."""

    model: str = "models/resnet56_fmnist.onnx"
    calib: str = "examples/fmnist_calib"  # 512 training images, as `onnx-cprune --calib` would get
    levels: tuple[int, ...] = (10, 15, 21)
    single_metrics: tuple[str, ...] = ("cka", "linear_1", "cosine")
    random_seeds: tuple[int, ...] = (0, 1, 2)
    train_images: int = 10_000  # the first N Fashion-MNIST training images, one pass: the fixed budget
    ft_batch_size: int = 64
    ft_seeds: tuple[int, ...] = (0, 1, 2)  # Consensus and the best single metric; others seed 0
    curve_budgets: tuple[int, ...] = (2_500, 5_000, 10_000, 20_000, 40_000, 60_000)
    robust_images: int = 1_000  # the first N test images
    fgsm_eps: tuple[float, ...] = (1 / 255, 4 / 255)  # in pixel units (images in [0, 1])
    pgd_steps: int = 10
    threads: int = 1  # per worker; the driver runs two workers on the two cores

    def key(self) -> str:
        return config_key(asdict(self))

    @property
    def criteria(self) -> list[str]:
        return (["consensus", *self.single_metrics] + [f"random{s}" for s in self.random_seeds]
                + ["published"])


CONFIG = Config()


def cache_dir(config: Config = CONFIG) -> Path:
    d = harness_cache_dir("paper", config.key())
    d.mkdir(parents=True, exist_ok=True)
    return d


def result_path(kind: str, name: str, config: Config = CONFIG, ext: str = "json") -> Path:
    d = cache_dir(config) / kind
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{name}.{ext}"


def load_result(kind: str, name: str, config: Config = CONFIG) -> BenchRow | None:
    """The cached row of ``kind`` / ``name`` (``rows.row_class``), or None when that unit has not run."""
    data = read_json(result_path(kind, name, config))
    return None if data is None else row_class(kind, name).from_json(data)


def save_result(kind: str, name: str, data: BenchRow, config: Config = CONFIG) -> None:
    write_json(result_path(kind, name, config), data)


def save_model(kind: str, name: str, model: onnx.ModelProto, config: Config = CONFIG) -> None:
    p = result_path(kind, name, config, ext="onnx")
    tmp = p.with_suffix(f".tmp{os.getpid()}")
    onnx.save(model, tmp)
    os.replace(tmp, p)


def load_saved_model(kind: str, name: str, config: Config = CONFIG) -> onnx.ModelProto:
    return onnx.load(result_path(kind, name, config, ext="onnx"))


def units_for_shard(units: list, spec: str | None) -> list:
    """``shard`` "k/n": every n-th unit starting at k (None: all); the harness's ``shard``."""
    return shard(units, spec)


def original_model(config: Config = CONFIG) -> onnx.ModelProto:
    return onnx.load(ROOT / config.model)


# ----------------------------------------------------------------------------------------------- data

def _folder(name: str, images: np.ndarray, labels: np.ndarray | None, config: Config) -> str:
    from tools.data.fmnist import to_cifar_input

    folder = ROOT / ".cache" / "paper" / "data" / name
    if not (folder / "x.npy").exists():
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "x.tmp.npy", to_cifar_input(images))
        if labels is not None:
            np.save(folder / "labels.npy", labels)
        os.replace(folder / "x.tmp.npy", folder / "x.npy")
    return str(folder)


def train_data(n: int, labelled: bool, config: Config = CONFIG):
    """CalibrationData of the first ``n`` training images (with labels, or without for distillation)."""
    from onnx_consensus import load_calibration
    from tools.data.fmnist import load_fmnist

    x, y = load_fmnist("train")
    name = f"train{n}" + ("" if labelled else "-nolabels")
    return load_calibration(_folder(name, x[:n], y[:n] if labelled else None, config), original_model(config))


def test_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 10,000 test images as the model's (N, 3, 32, 32) float32 input, and their labels."""
    from tools.data.fmnist import load_fmnist, to_cifar_input

    x, y = load_fmnist("test")
    return to_cifar_input(x), y


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, threads: int = 1,
             batch_size: int = 250) -> float:
    """Top-1 accuracy (fraction) of ``model`` in onnxruntime on (x, y)."""
    from onnx_consensus.runtime import make_session

    sess = make_session(model, threads=threads)
    name = sess.get_inputs()[0].name
    hits = 0
    for i in range(0, len(x), batch_size):
        out = sess.run(None, {name: x[i:i + batch_size]})[0]
        hits += int((out.argmax(1) == y[i:i + batch_size]).sum())
    return hits / len(x)


# ------------------------------------------------------------------------------------- pruned models

def pruned_model(criterion: str, level: int, config: Config = CONFIG) -> onnx.ModelProto:
    """The original with the first ``level`` blocks of ``criterion``'s removal order taken out."""
    from onnx_consensus import find_blocks, remove_blocks

    run = load_result("prune", criterion, config)
    if run is None:
        raise RuntimeError(f"no pruning run for {criterion}: run python -m tools.paper.prune_runs first")
    model = original_model(config)
    blocks = find_blocks(model).by_id()
    return remove_blocks(model, [blocks[i] for i in run.order[:level]])


@dataclass
class Timer:
    start: float = field(default_factory=time.perf_counter)

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def worker_args(doc: str, argv=None, extra=None):
    """Parse a worker script's arguments (``--shard k/n``, plus what ``extra(parser)`` adds) and pin its
    threads to Config.threads."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shard(ap)
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    set_threads(CONFIG.threads)
    return args


def set_threads(threads: int) -> None:
    """One worker's thread budget for torch and BLAS (onnxruntime sessions get it explicitly)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
