"""Output fidelity and accuracy of a model against the original, on streamed data."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .runtime import make_session


@dataclass
class Fidelity:
    """How close a model's first output stays to a reference's, over ``n`` samples.

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
                      threads: int | None = None) -> np.ndarray:
    """The first output of ``model`` on the samples ``indices``: (n, ...) array (kept for comparisons;
    the hold-out set is small)."""
    sess = make_session(model, level="all", threads=threads)
    return np.concatenate([sess.run([sess.get_outputs()[0].name], feeds)[0]
                           for feeds in data.batches(batch_size, indices)])


def fidelity(model: onnx.ModelProto, reference: np.ndarray, data, indices, *, labels: np.ndarray | None = None,
             batch_size: int = 64, threads: int | None = None) -> Fidelity:
    """Compare ``model``'s first output on ``indices`` with ``reference`` (from ``reference_outputs``)."""
    out = reference_outputs(model, data, indices, batch_size=batch_size, threads=threads)
    return compare(out, reference, labels)


def compare(out: np.ndarray, reference: np.ndarray, labels: np.ndarray | None = None) -> Fidelity:
    """Fidelity of outputs ``out`` against ``reference`` (same shape, first axis = samples)."""
    n = len(reference)
    o = out.reshape(n, -1).astype(np.float64)
    r = reference.reshape(n, -1).astype(np.float64)
    rel = float(np.mean(np.linalg.norm(o - r, axis=1) / np.maximum(np.linalg.norm(r, axis=1), 1e-12)))
    classifier = reference.ndim == 2 and reference.shape[1] > 1
    agreement = float(np.mean(o.argmax(1) == r.argmax(1))) if classifier else None
    acc = ref_acc = None
    if classifier and labels is not None:
        acc = float(np.mean(o.argmax(1) == labels))
        ref_acc = float(np.mean(r.argmax(1) == labels))
    return Fidelity(n, agreement, rel, acc, ref_acc)
