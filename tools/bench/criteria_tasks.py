"""The models of the criterion benchmark (issue 13) and their task measures (``tools/bench/criteria.py``).

Each ``Task`` names an ONNX model, its calibration folder, the cut levels (blocks removed), and how its task
measure is computed: on the test data (the first Fashion-MNIST test images or sequences; the corpus models'
own eval samples) and on the held-back part of the calibration data (for the greedy oracle). Measures are
"higher is better", in percent:

- ``label_acc``: top-1 accuracy against class labels (%); tie-break: mean log-probability of the label;
- ``next_token``: next-token top-1 accuracy over every position of every sequence (%), as
  tools/data/train_tokens.py measures the decoder; tie-break: mean log-probability of the next token;
- ``cosine``: mean cosine (x100) of the model's output rows with the ORIGINAL model's on the same inputs
  (an embedding model has no labels: the user keeps what the original computed); tie-break: the share of
  samples whose nearest neighbour among the others is unchanged.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
FMNIST_TEST = 2000  # first test images / sequences of Fashion-MNIST
CORPUS_EVAL = {"ppocr_cls": 512, "minilm": 256}  # the corpus models' eval samples (tools.data.real_models, split eval)
CORPUS_CALIB = 128


@dataclass(frozen=True)
class Task:
    """One benchmark model.

    name: table key; model: the .onnx path (relative to the repo); calib: its calibration folder; levels:
    blocks removed at each cut level (one pruning run to the deepest gives the others); measure: label_acc |
    next_token | cosine; test: () -> list of (feeds, targets) batches of the test data (targets: labels or
    None)."""

    name: str
    model: str
    calib: str
    levels: tuple[int, ...]
    measure: str
    test: Callable[[], list] = field(compare=False, repr=False)
    class_scores: bool = True

    @property
    def path(self) -> Path:
        return ROOT / self.model

    def key(self) -> dict:
        return {"model": self.model, "calib": self.calib, "levels": list(self.levels), "measure": self.measure}


def _chunks(feeds: dict[str, np.ndarray], targets, batch: int = 250) -> list:
    n = len(next(iter(feeds.values())))
    return [({k: v[i:i + batch] for k, v in feeds.items()}, None if targets is None else targets[i:i + batch])
            for i in range(0, n, batch)]


def _fmnist_images(kind: str) -> Callable[[], list]:
    def make():
        from tools.data.fmnist import load_fmnist, to_cifar_input
        from tools.data.train_vit import to_vit_input

        x, y = load_fmnist("test")
        x, y = x[:FMNIST_TEST], y[:FMNIST_TEST]
        x = to_cifar_input(x) if kind == "cifar" else to_vit_input(x)
        return _chunks({"input": x}, y)
    return make


def _fmnist_encoder() -> list:
    from tools.data.fmnist import load_fmnist
    from tools.data.train_tokens import BUCKETS, bucket_of, padded, to_tokens

    x, y = load_fmnist("test")
    ids, lengths = to_tokens(x[:FMNIST_TEST])
    y = y[:FMNIST_TEST]
    out = []
    for b in BUCKETS:
        sel = np.flatnonzero(bucket_of(lengths) == b)
        if len(sel):
            i, m = padded(ids[sel], lengths[sel], b)
            out += _chunks({"input_ids": i, "padding_mask": m}, y[sel])
    return out


def _fmnist_decoder() -> list:
    from tools.data.fmnist import load_fmnist
    from tools.data.train_tokens import to_tokens

    x, _ = load_fmnist("test")
    ids, _ = to_tokens(x[:FMNIST_TEST])
    return _chunks({"input_ids": ids}, None)  # full 49 tokens: position t predicts token t+1 (causal)


def _corpus(name: str) -> Callable[[], list]:
    def make():
        import onnx

        from onnx_consensus import load_calibration
        data = load_calibration(corpus_folder(name, "eval"), onnx.load(ROOT / corpus_model(name), load_external_data=False))
        out, start = [], 0
        for feeds in data.batches(64):
            n = len(next(iter(feeds.values())))
            out.append((feeds, None if data.labels is None else data.labels[start:start + n]))
            start += n
        return out
    return make


def corpus_model(name: str) -> str:
    return f".cache/real-models/{name}/model.onnx"


def corpus_folder(name: str, split: str) -> str:
    """The corpus model's data folder (tools.data.real_models.calib writes it on first use)."""
    from tools.data.real_models import REGISTRY, calib

    n = CORPUS_CALIB if split == "calib" else CORPUS_EVAL[name]
    return str(calib(name, split, n, REGISTRY[name].folder / f"{split}{n}"))


TASKS = {t.name: t for t in (
    Task("resnet56", "models/resnet56_fmnist.onnx", "examples/fmnist_calib", (5, 10, 15), "label_acc",
         _fmnist_images("cifar")),
    Task("vit", "models/vit_fmnist.onnx", "examples/fmnist_vit_calib", (3, 6), "label_acc", _fmnist_images("vit")),
    Task("postln", "models/postln_fmnist_tokens.onnx", "examples/fmnist_tokens", (2, 4), "label_acc",
         _fmnist_encoder),
    Task("decoder", "models/decoder_fmnist_tokens.onnx", "examples/fmnist_tokens_dec", (2, 4), "next_token",
         _fmnist_decoder),
    Task("ppocr_cls", corpus_model("ppocr_cls"), "corpus:ppocr_cls", (2, 3), "label_acc", _corpus("ppocr_cls")),
    Task("minilm", corpus_model("minilm"), "corpus:minilm", (3, 6), "cosine", _corpus("minilm"), class_scores=False),
)}


def calib_folder(task: Task) -> str:
    if task.calib.startswith("corpus:"):
        return corpus_folder(task.calib.split(":", 1)[1], "calib")
    return str(ROOT / task.calib)


# ---------------------------------------------------------------------------------------------- measures

def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _nearest(e: np.ndarray) -> np.ndarray:
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    s = e @ e.T
    np.fill_diagonal(s, -np.inf)
    return s.argmax(1)


def task_measure(kind: str, outs: list[np.ndarray], feeds: list[dict], targets: list, refs: list | None = None
                 ) -> tuple[float, float]:
    """(measure in %, tie-break) of a model's first output over batches. outs: per batch (N, C) class scores,
    (N, T, V) next-token logits or (N, D) embeddings; feeds: the batches' inputs; targets: per batch labels
    (label_acc); refs: the original model's outputs per batch (cosine)."""
    if kind == "label_acc":
        z = np.concatenate([o.reshape(len(o), -1) for o in outs])
        y = np.concatenate(targets)
        lp = _log_softmax(z)
        return 100.0 * float((z.argmax(1) == y).mean()), float(lp[np.arange(len(y)), y].mean())
    if kind == "next_token":
        hits = logp = count = 0.0
        for o, f in zip(outs, feeds):
            ids = f["input_ids"]
            pred, nxt = o[:, :-1], ids[:, 1:]
            lp = _log_softmax(pred)
            hits += float((pred.argmax(-1) == nxt).sum())
            logp += float(np.take_along_axis(lp, nxt[..., None], -1).sum())
            count += nxt.size
        return 100.0 * hits / count, logp / count
    if kind == "cosine":
        a = np.concatenate([r.reshape(len(r), -1) for r in refs]).astype(np.float64)
        b = np.concatenate([o.reshape(len(o), -1) for o in outs]).astype(np.float64)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        return 100.0 * float(cos.mean()), float((_nearest(a) == _nearest(b)).mean())
    raise ValueError(f"unknown measure {kind!r}")


def first_outputs(model, batches: list[dict], threads: int = 1) -> list[np.ndarray]:
    """The model's first output on each feed batch (onnxruntime, ``threads`` intra-op threads)."""
    from onnx_consensus.runtime import make_session

    sess = make_session(model, threads=threads)
    names = {i.name for i in sess.get_inputs()}
    first = sess.get_outputs()[0].name
    if len(names) == 1:  # one-input models: the batch's one array, whatever its key
        only = next(iter(names))
        return [sess.run([first], {only: next(iter(f.values()))})[0] for f in batches]
    return [sess.run([first], {k: v for k, v in f.items() if k in names})[0] for f in batches]


def evaluate(task: Task, model, batches: list, refs: list | None = None) -> tuple[float, float]:
    """The task measure of ``model`` on ``batches`` (list of (feeds, targets)); refs: the original's outputs."""
    feeds = [f for f, _ in batches]
    return task_measure(task.measure, first_outputs(model, feeds), feeds, [t for _, t in batches], refs)
