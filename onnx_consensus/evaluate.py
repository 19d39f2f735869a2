"""Output fidelity and accuracy of a model against the original, on streamed data.

Fidelity is measured in the task's own terms, per head of the output plan (``kinds``: detections kept for
detectors, mask IoU for text maps, equal strings for CTC, top-1 agreement for class scores, cosine for
embeddings, per-channel standardised fidelity for other values, or the user's --fidelity function); the
budget, the collapse warning and the summary read the head with the lowest value (the user's function when
given). For every float output the mean per-sample cosine and relative error are kept too (the report).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .batching import counted_batches, per_sample
from .kinds import HeadResult, OutputPlan, plan_from_kinds
from .kinds.basic import CLASS_SCORES
from .metrics.output import is_class_scores
from .runtime import make_session

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
        (judged from the graph, ``kinds.outputs.output_kinds``; from the shape (N, classes) when no kinds are
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
    heads: list[HeadResult] = field(default_factory=list)

    def to_json(self) -> dict:
        skip = ("outputs", "heads")
        out = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items() if k not in skip}
        out["outputs"] = [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(o).items()}
                          for o in self.outputs]
        out["heads"] = [h.to_json() for h in self.heads]
        deciding = self.deciding
        out["measure"] = {"name": deciding.measure, "value": round(deciding.value, 6),
                          "text": deciding.text} if deciding else None
        return out

    @property
    def deciding(self) -> HeadResult | None:
        """The head the budget reads: the user's --fidelity when given, else the lowest value (first on ties)."""
        if not self.heads:
            return None
        if self.heads[0].kind == "custom":
            return self.heads[0]
        return min(self.heads, key=lambda h: h.value)

    @property
    def measure(self) -> tuple[str, float]:
        """The budget's measure: (name, value) of the deciding head (``deciding``: e.g. ("detections kept",
        0.39), ("agreement", 0.97)); without heads, top-1 agreement, else mean cosine, else relative error."""
        if self.deciding is not None:
            return self.deciding.measure, self.deciding.value
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
        """A plain sentence when the outputs collapsed (a head's value under its kind's collapse level:
        detections kept, agreement, mask IoU, equal strings, standardised fidelity or the user's measure
        < 0.5, embedding cosine < 0.9), else None."""
        if self.heads:
            custom = self.heads[0] if self.heads[0].kind == "custom" else None
            for h in [custom] if custom else self.heads:
                if h.collapsed():
                    what = "top-1 agreement" if h.measure == "agreement" else h.measure
                    return f"{what} {h.value:.4f} < {h.collapse}"
            return None
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
    axes = data.batch_axes
    fixed = data.fixed_batch

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
    if not is_class_scores(a.shape, None):
        return None
    return a.reshape(-1, a.shape[-1])


def compare(out, reference, labels: np.ndarray | None = None, *,
            kinds: OutputPlan | Mapping[str, str] | str | None = None) -> Fidelity:
    """Fidelity of outputs against reference outputs: arrays (first axis = samples), matching lists of
    per-batch arrays, or lists of per-batch {output name: array}. ``kinds``: the OutputPlan, or {name: kind}
    for dicts (every name compared, the first one is "the first output"), or one kind for arrays; None:
    arrays of shape (N, classes) count as class scores (the behaviour before output kinds)."""
    plan = kinds if isinstance(kinds, OutputPlan) else None
    if plan is not None:
        kinds = plan.kinds
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
            classes = all(is_class_scores(r[name].shape, None, sequence=False) for r in refs)
            kind = CLASS_SCORES if classes else "generic"
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
    if plan is None:
        plan = plan_from_kinds({str(nm) if nm is not None else "output": o.kind for nm, o in zip(names, per_output)})
    key = {nm: (str(nm) if nm is not None else "output") for nm in names}
    return Fidelity(n, first_agree, float(np.mean(first_rel)), acc, ref_acc, cosine, per_output[0].kind, per_output,
                    _head_results(plan, [{key[k]: v for k, v in o.items() if k in key} for o in outs],
                                  [{key[k]: v for k, v in r.items() if k in key} for r in refs]))


def _head_results(plan: OutputPlan, outs: list[dict], refs: list[dict]) -> list[HeadResult]:
    """Every measure of ``plan`` over the batches (per-batch {output: (samples, ...)})."""
    measures = plan.measures()
    for o, r in zip(outs, refs):
        for m in measures:
            wanted = m.head.outputs
            m.add({k: np.asarray(r[k]) for k in wanted}, {k: np.asarray(o[k]) for k in wanted})
    return [m.result() for m in measures]
