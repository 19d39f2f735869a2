"""Output fidelity and accuracy of a model against the original, on streamed data.

Fidelity is measured in each output's own terms (``graph.heads.output_kinds``): for every float output the
mean over samples of the cosine between the output and the reference (each sample's output flattened) and
the mean relative error; top-1 agreement only for class scores.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .batching import counted_batches, per_sample
from .runtime import make_session

CLASS_SCORES = "class scores"
COLLAPSE_AGREEMENT = 0.5
COLLAPSE_COSINE = 0.9


@dataclass
class OutputFidelity:
    """One output: its ``kind``, mean per-sample ``cosine`` and ``rel_error``, top-1 ``agreement`` (class
    scores only; rows of a (N, T, classes) sequence are positions)."""

    name: str
    kind: str
    cosine: float
    rel_error: float
    agreement: float | None = None


@dataclass
class Fidelity:
    """How close a model's outputs stay to a reference's, over ``n`` samples (samples fed, never output
    rows or time steps).

    agreement: share of samples with the same top-1 class on the first output, when it is class scores
        (judged from the graph, ``graph.heads.output_kinds``; from the shape (N, classes) when no kinds are
        given), else None.
    rel_error: mean over samples of ||y - y_ref||_2 / ||y_ref||_2 on the first output.
    accuracy / reference_accuracy: top-1 accuracy against labels, when labels are given.
    cosine: mean over the float outputs of each one's mean per-sample cosine (None when not measured).
    kind: the first output's kind; outputs: every compared output.
    """

    n: int
    agreement: float | None
    rel_error: float
    accuracy: float | None = None
    reference_accuracy: float | None = None
    cosine: float | None = None
    kind: str = "generic"
    outputs: list[OutputFidelity] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items() if k != "outputs"}
        out["outputs"] = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(o).items()}
                          for o in self.outputs]
        return out

    @property
    def measure(self) -> tuple[str, float]:
        """The budget's measure: ("agreement", top-1 agreement) for class scores, else ("cosine", mean
        cosine); ("relative error", ...) only when no cosine was measured."""
        if self.agreement is not None:
            return "agreement", self.agreement
        if self.cosine is not None:
            return "cosine", self.cosine
        return "relative error", self.rel_error

    def meets(self, min_agreement: float) -> bool:
        """Agreement >= min_agreement for class scores, else mean cosine >= min_agreement."""
        name, value = self.measure
        if name == "relative error":
            return value <= 1.0 - min_agreement
        return value >= min_agreement - 1e-12

    def budget_text(self, min_agreement: float) -> str:
        """The measure against the budget, e.g. "cosine 0.9312 < 0.99"."""
        name, value = self.measure
        if name == "relative error":
            return f"relative error {value:.4f} > {1.0 - min_agreement:g}"
        return f"{name} {value:.4f} {'>=' if self.meets(min_agreement) else '<'} {min_agreement:g}"

    def collapse(self) -> str | None:
        """A plain sentence when the outputs collapsed (agreement < 0.5 for class scores, else mean cosine
        < 0.9), else None."""
        if self.agreement is not None:
            if self.agreement < COLLAPSE_AGREEMENT:
                return f"top-1 agreement {self.agreement:.4f} < {COLLAPSE_AGREEMENT}"
            return None
        if self.cosine is not None and self.cosine < COLLAPSE_COSINE:
            what = "embedding" if self.kind == "embedding" else "output"
            return f"{what} cosine {self.cosine:.4f} < {COLLAPSE_COSINE}"
        return None


def reference_outputs(model: onnx.ModelProto, data, indices, *, batch_size: int = 64,
                      threads: int | None = None, names: Sequence[str] | None = None) -> list:
    """The outputs of ``model`` on the samples ``indices``, one entry per batch (batches may differ in
    their non-batch shape, e.g. sequence length): the first output's array when ``names`` is None, else
    {name: array} for ``names``. Each array is (samples, ...): the sample axis first (a time-major (T, B, C)
    output becomes (B, T, C)), a fixed batch's padding dropped (``batching.per_sample``), so rows are
    samples. Kept for comparisons: the hold-out set is small."""
    sess = make_session(model, level="all", threads=threads, arena=False)  # memory freed after each run
    single = names is None
    names = [sess.get_outputs()[0].name] if single else list(names)
    fed = batch_rows(data)
    out = []
    for feeds, n in counted_batches(data, batch_size, indices):
        values = {nm: per_sample(v, fed(feeds), n, name=f"output {nm!r}", strict=False)
                  for nm, v in zip(names, sess.run(names, feeds))}
        out.append(values[names[0]] if single else values)
    return out


def batch_rows(data):
    """A function of a feed: how many samples it holds (the fixed batch, else the size of the first batched
    input along its batch axis)."""
    axes = getattr(data, "batch_axes", {})
    fixed = getattr(data, "fixed_batch", None)

    def rows(feeds) -> int:
        if fixed:
            return fixed
        for k, v in feeds.items():
            ax = axes.get(k, 0)
            if ax is not None and np.ndim(v):
                return v.shape[ax]
        return 1
    return rows


def fidelity(model: onnx.ModelProto, reference: list, data, indices, *, labels: np.ndarray | None = None,
             batch_size: int = 64, threads: int | None = None, kinds: Mapping[str, str] | None = None) -> Fidelity:
    """Compare ``model``'s outputs on ``indices`` with ``reference`` (from ``reference_outputs``, the same
    ``names``: the keys of ``kinds`` when the reference holds dicts)."""
    names = list(reference[0]) if reference and isinstance(reference[0], dict) else None
    out = reference_outputs(model, data, indices, batch_size=batch_size, threads=threads, names=names)
    return compare(out, reference, labels, kinds=kinds)


def _rows(o: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(r) if r.ndim else 1
    return o.reshape(n, -1).astype(np.float64), r.reshape(n, -1).astype(np.float64)


def _cosine(o2: np.ndarray, r2: np.ndarray) -> np.ndarray:
    no, nr = np.linalg.norm(o2, axis=1), np.linalg.norm(r2, axis=1)
    cos = np.einsum("nd,nd->n", o2, r2) / np.maximum(no * nr, 1e-30)
    return np.where((no == 0) & (nr == 0), 1.0, np.clip(cos, -1.0, 1.0))


def _class_rows(a: np.ndarray) -> np.ndarray | None:
    """(rows, classes) of class scores, or None when the array is not (N, C) / (N, T, C) with C >= 2."""
    if a.ndim not in (2, 3) or a.shape[-1] < 2:
        return None
    return a.reshape(-1, a.shape[-1])


def compare(out, reference, labels: np.ndarray | None = None, *, kinds: Mapping[str, str] | str | None = None
            ) -> Fidelity:
    """Fidelity of outputs against reference outputs: arrays (first axis = samples), matching lists of
    per-batch arrays, or lists of per-batch {output name: array}. ``kinds``: {name: kind} for dicts (every
    name compared, the first one is "the first output"), or one kind for arrays; None: arrays of shape
    (N, classes) count as class scores (the behaviour before output kinds)."""
    outs = out if isinstance(out, list) else [out]
    refs = reference if isinstance(reference, list) else [reference]
    if refs and isinstance(refs[0], dict):
        names = list(kinds) if isinstance(kinds, Mapping) else list(refs[0])
        kind_of = dict(kinds) if isinstance(kinds, Mapping) else {}
    else:
        names = [None]
        outs, refs = [{None: o} for o in outs], [{None: r} for r in refs]
        kind_of = {None: kinds} if isinstance(kinds, str) else {}
    per_output = []
    first_agree: list = []
    preds: list = []
    first_rel: np.ndarray | None = None
    for k, name in enumerate(names):
        kind = kind_of.get(name)
        if kind is None:
            kind = CLASS_SCORES if all(r[name].ndim == 2 and r[name].shape[1] > 1 for r in refs) else "generic"
        rel, cos, agree = [], [], []
        classify = kind == CLASS_SCORES
        for o, r in zip(outs, refs):
            o2, r2 = _rows(np.asarray(o[name]), np.asarray(r[name]))
            rel.append(np.linalg.norm(o2 - r2, axis=1) / np.maximum(np.linalg.norm(r2, axis=1), 1e-12))
            cos.append(_cosine(o2, r2))
            oc, rc = _class_rows(np.asarray(o[name])), _class_rows(np.asarray(r[name]))
            if classify and oc is not None and rc is not None:
                agree.append(oc.argmax(1) == rc.argmax(1))
                if k == 0 and np.asarray(r[name]).ndim == 2:
                    preds.append((oc.argmax(1), rc.argmax(1)))
            else:
                classify = False
        agreement = float(np.mean(np.concatenate(agree))) if classify and agree else None
        per_output.append(OutputFidelity(str(name) if name is not None else "output", kind,
                                         float(np.mean(np.concatenate(cos))), float(np.mean(np.concatenate(rel))),
                                         agreement))
        if k == 0:
            first_agree, first_rel = agreement, np.concatenate(rel)
    n = int(sum(len(r[names[0]]) for r in refs))
    acc = ref_acc = None
    if first_agree is not None and labels is not None and preds:
        p_out = np.concatenate([p for p, _ in preds])
        p_ref = np.concatenate([q for _, q in preds])
        labels = np.asarray(labels)
        if len(labels) == len(p_out):
            acc, ref_acc = float(np.mean(p_out == labels)), float(np.mean(p_ref == labels))
    cosine = float(np.mean([o.cosine for o in per_output]))
    return Fidelity(n, first_agree, float(np.mean(first_rel)), acc, ref_acc, cosine, per_output[0].kind, per_output)
