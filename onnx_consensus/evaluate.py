"""Output fidelity and accuracy of a model against the original, on streamed data."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .batching import counted_batches, per_sample
from .runtime import make_session


@dataclass
class Fidelity:
    """How close a model's first output stays to a reference's, over ``n`` samples (samples fed, never
    output rows or time steps).

    agreement: share of samples with the same top-1 class (None when the output is not (N, classes)).
    rel_error: mean over samples of ||y - y_ref||_2 / ||y_ref||_2 on the first output.
    accuracy / reference_accuracy: top-1 accuracy against labels, when labels are given.
    """

    n: int
    agreement: float | None
    rel_error: float
    accuracy: float | None = None
    reference_accuracy: float | None = None

    def to_json(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}

    def meets(self, min_agreement: float) -> bool:
        """Agreement >= min_agreement for classifiers; else relative error <= 1 - min_agreement."""
        if self.agreement is not None:
            return self.agreement >= min_agreement - 1e-12
        return self.rel_error <= 1.0 - min_agreement


def reference_outputs(model: onnx.ModelProto, data, indices, *, batch_size: int = 64,
                      threads: int | None = None) -> list[np.ndarray]:
    """The first output of ``model`` on the samples ``indices``, one array per batch (batches may differ
    in their non-batch shape, e.g. sequence length), each (samples, ...): the sample axis first (a time-major
    (T, B, C) output becomes (B, T, C)), a fixed batch's padding dropped (``batching.per_sample``), so rows
    are samples. Kept for comparisons: the hold-out set is small."""
    sess = make_session(model, level="all", threads=threads)
    name = sess.get_outputs()[0].name
    fed = batch_rows(data)
    return [per_sample(sess.run([name], feeds)[0], fed(feeds), n, name=f"output {name!r}", strict=False)
            for feeds, n in counted_batches(data, batch_size, indices)]


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


def fidelity(model: onnx.ModelProto, reference: list[np.ndarray], data, indices, *,
             labels: np.ndarray | None = None, batch_size: int = 64, threads: int | None = None) -> Fidelity:
    """Compare ``model``'s first output on ``indices`` with ``reference`` (from ``reference_outputs``)."""
    out = reference_outputs(model, data, indices, batch_size=batch_size, threads=threads)
    return compare(out, reference, labels)


def compare(out, reference, labels: np.ndarray | None = None) -> Fidelity:
    """Fidelity of outputs against reference outputs: arrays (first axis = samples) or matching lists of
    per-batch arrays. Top-1 agreement and accuracy only for (N, classes) outputs."""
    outs = out if isinstance(out, list) else [out]
    refs = reference if isinstance(reference, list) else [reference]
    rel, agree, pred = [], [], []
    classifier = all(r.ndim == 2 and r.shape[1] > 1 for r in refs)
    for o, r in zip(outs, refs):
        n = len(r)
        o2 = o.reshape(n, -1).astype(np.float64)
        r2 = r.reshape(n, -1).astype(np.float64)
        rel.append(np.linalg.norm(o2 - r2, axis=1) / np.maximum(np.linalg.norm(r2, axis=1), 1e-12))
        if classifier:
            agree.append(o2.argmax(1) == r2.argmax(1))
            pred.append((o2.argmax(1), r2.argmax(1)))
    n = int(sum(len(r) for r in refs))
    agreement = float(np.mean(np.concatenate(agree))) if classifier else None
    acc = ref_acc = None
    if classifier and labels is not None:
        p_out = np.concatenate([p for p, _ in pred])
        p_ref = np.concatenate([q for _, q in pred])
        labels = np.asarray(labels)
        acc, ref_acc = float(np.mean(p_out == labels)), float(np.mean(p_ref == labels))
    return Fidelity(n, agreement, float(np.mean(np.concatenate(rel))), acc, ref_acc)
