"""Per-kind fidelity measures: the pruned model's outputs against the ORIGINAL's, streamed batch by batch.

A ``Measure`` takes batches (``add(ref, out)``: {output name: (samples, ...) array}, the head's outputs, the
sample axis first) and keeps bounded state (sums and counts, never the arrays). ``result()`` gives a
``HeadResult``: ``value`` in [0, 1] (1 = the task is unchanged; the budget and the collapse warning read it),
``damage`` >= 0 (0 = unchanged; continuous, so the ranking can order blocks that all keep the value at 1),
and the sentence the summary prints.

The basic kinds:
- class scores: top-1 agreement (rows: samples, or positions of a (N, T, C) sequence); damage the mean
  KL(original || pruned) of the softmax in nats. When every original row has the same top-1 class,
  agreement is nearly blind (a 2-class model keeps 1.0 whatever is removed): the value is then the lower of
  agreement and exp(-KL), and the text says so.
- embedding: mean cosine per sample (value clipped at 0); damage 1 - cosine.
- generic (regressions, states, anything else): per-channel standardised error
  err = mean over channels c of SSE_c / (count_c * var_c), var_c the ORIGINAL's variance of channel c over
  the data (every axis but the channel axis), so a channel in pixels weighs like one in probabilities and
  rescaling a channel's units changes nothing; value exp(-err) (1 - value ~ the share of the original's
  per-channel variance the pruned model gets wrong when small), damage err. Channel axis: the head's
  ``channel_axis`` when the graph says (a channels-first (N, C, L) tensor, ``basic.generic_head``), else the
  last for rank 2 and 3, axis 1 for rank 4 and more (NCHW maps), none for rank 0-1.
- a user's function (``--fidelity module:function``): called per batch with ({name: original}, {name:
  pruned}) and averaged weighted by samples; damage 1 - value.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass
class HeadResult:
    """One head's comparison: ``measure`` (its name, e.g. "detections kept"), ``value`` in [0, 1],
    ``damage`` >= 0, ``text`` (the summary's words), ``collapse`` (the value under which the outputs
    collapsed), ``blind`` (a warning when the measure cannot see damage on this data), ``details``."""

    kind: str
    outputs: tuple[str, ...]
    measure: str
    value: float
    damage: float
    text: str
    collapse: float = 0.5
    blind: str | None = None
    details: dict = field(default_factory=dict)

    def collapsed(self) -> str | None:
        """The sentence when value < collapse, else None."""
        return self.text if self.value < self.collapse else None

    def to_json(self) -> dict:
        r = lambda v: round(float(v), 6) if isinstance(v, (float, np.floating)) else v  # noqa: E731
        return {"kind": self.kind, "outputs": list(self.outputs), "measure": self.measure, "value": r(self.value),
                "damage": r(self.damage), "text": self.text, "blind": self.blind,
                "details": {k: r(v) for k, v in self.details.items()}}


class Measure:
    """Base: ``add`` batches, then ``result``. ``head``: the kinds.registry.Head measured."""

    def __init__(self, head):
        self.head = head
        self.n = 0

    def add(self, ref: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray]) -> None:
        raise NotImplementedError

    def result(self) -> HeadResult:
        raise NotImplementedError

    def blind_note(self) -> str | None:
        """After the original's own outputs were added as both sides: why this measure cannot see damage on
        this data, or None."""
        return None


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class ClassMeasure(Measure):
    """Class scores (N, C) or (N, T, C): agreement, KL; exp(-KL) when agreement is blind (one class)."""

    def __init__(self, head):
        super().__init__(head)
        self.agree = self.rows = 0
        self.kl = 0.0
        self.first_class: int | None = None
        self.one_class = True

    def add(self, ref, out) -> None:
        name = self.head.outputs[0]
        r, o = np.asarray(ref[name], np.float64), np.asarray(out[name], np.float64)
        self.n += len(r) if r.ndim else 1
        c = r.shape[-1] if r.ndim else 1
        r, o = r.reshape(-1, c), o.reshape(-1, c)
        if self.head.arg("form") == "probabilities":
            r, o = np.log(np.clip(r, 1e-30, None)), np.log(np.clip(o, 1e-30, None))
        ra, oa = r.argmax(1), o.argmax(1)
        self.agree += int((ra == oa).sum())
        self.rows += len(ra)
        lp, lq = _log_softmax(r), _log_softmax(o)
        self.kl += float(np.maximum((np.exp(lp) * (lp - lq)).sum(axis=1), 0.0).sum())
        if len(ra):
            self.first_class = int(ra[0]) if self.first_class is None else self.first_class
            self.one_class = self.one_class and bool((ra == self.first_class).all())

    def blind_note(self) -> str | None:
        if self.one_class and self.rows > 1:
            return (f"every original prediction on these {self.rows} hold-out rows is class {self.first_class}: "
                    "top-1 agreement is nearly blind, so the class-score KL is read too (exp(-KL))")
        return None

    def result(self) -> HeadResult:
        rows = max(self.rows, 1)
        agreement, kl = self.agree / rows, self.kl / rows
        details = {"agreement": agreement, "kl": kl, "rows": self.rows}
        if self.one_class and self.rows > 1 and np.exp(-kl) < agreement:
            value = float(np.exp(-kl))
            blind = (f"every original prediction on these {self.rows} rows is class {self.first_class}: top-1 "
                     f"agreement barely sees damage, so fidelity is also read as exp(-KL) of the class scores")
            return HeadResult(self.head.kind, self.head.outputs, "class-score exp(-KL)", value, kl,
                              f"class-score exp(-KL) {value:.4f} (KL {kl:.4f} nats; top-1 agreement {agreement:.4f} "
                              "is nearly blind: one class)", 0.5, blind, details)
        return HeadResult(self.head.kind, self.head.outputs, "agreement", agreement, kl,
                          f"top-1 agreement {agreement:.4f}, KL {kl:.4f}", 0.5, None, details)


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return a.reshape(len(a), -1) if a.ndim else a.reshape(1, 1)


class EmbeddingMeasure(Measure):
    """Mean per-sample cosine of the flattened outputs."""

    def __init__(self, head):
        super().__init__(head)
        self.cos = 0.0

    def add(self, ref, out) -> None:
        name = self.head.outputs[0]
        r, o = _rows(ref[name]), _rows(out[name])
        nr, no = np.linalg.norm(r, axis=1), np.linalg.norm(o, axis=1)
        cos = np.einsum("nd,nd->n", r, o) / np.maximum(nr * no, 1e-30)
        cos = np.where((nr == 0) & (no == 0), 1.0, np.clip(cos, -1.0, 1.0))
        self.cos += float(cos.sum())
        self.n += len(r)

    def result(self) -> HeadResult:
        cos = self.cos / max(self.n, 1)
        return HeadResult(self.head.kind, self.head.outputs, "embedding cosine", max(cos, 0.0), 1.0 - cos,
                          f"embedding cosine {cos:.4f}", 0.9, None, {"cosine": cos})


def channel_axis(ndim: int) -> int | None:
    """The channel axis of a (samples-first) array: last for rank 2-3, 1 for rank >= 4, None below 2."""
    if ndim < 2:
        return None
    return ndim - 1 if ndim <= 3 else 1


class ChannelMeasure(Measure):
    """Per-channel standardised error of one output (see the module docstring)."""

    def __init__(self, head, name: str | None = None, channels: slice | None = None):
        super().__init__(head)
        self.name = name or head.outputs[0]
        self.channels = channels
        self.sums: np.ndarray | None = None  # (3, C): sum, sum of squares of the original, SSE

    def add(self, ref, out) -> None:
        r, o = np.asarray(ref[self.name], np.float64), np.asarray(out[self.name], np.float64)
        self.n += len(r) if r.ndim else 1
        self.add_arrays(r, o)

    def add_arrays(self, r: np.ndarray, o: np.ndarray) -> None:
        ax = self.head.arg("channel_axis", channel_axis(r.ndim)) if r.ndim >= 2 else None
        if ax is None:
            r, o = r.reshape(-1, 1), o.reshape(-1, 1)
        else:
            r, o = np.moveaxis(r, ax, -1), np.moveaxis(o, ax, -1)
            r, o = r.reshape(-1, r.shape[-1]), o.reshape(-1, o.shape[-1])
        if self.channels is not None:
            r, o = r[:, self.channels], o[:, self.channels]
        part = np.stack([r.sum(0), np.square(r).sum(0), np.square(o - r).sum(0), np.full(r.shape[1], len(r))])
        if self.sums is None:
            self.sums = part
        elif self.sums.shape == part.shape:  # a batch whose channel count differs is left out
            self.sums = self.sums + part

    def error(self) -> float:
        """Mean over channels of SSE_c / (count_c * var_c) (var_c: the original's; 0 -> its mean square -> 1)."""
        if self.sums is None:
            return 0.0
        s, s2, sse, cnt = self.sums
        cnt = np.maximum(cnt, 1)
        var = np.maximum(s2 / cnt - (s / cnt) ** 2, 0.0)
        scale = np.where(var > 1e-12 * np.maximum(s2 / cnt, 1e-30), var, s2 / cnt)
        scale = np.where(scale > 0, scale, 1.0)
        return float(np.mean(sse / (cnt * scale)))

    def result(self) -> HeadResult:
        err = self.error()
        value = float(np.exp(-err))
        return HeadResult(self.head.kind, self.head.outputs, "standardised fidelity", value, err,
                          f"standardised fidelity exp(-err) {value:.4f} (per-channel error {err:.4f} of the "
                          "original's variance)", 0.5, None, {"error": err})


class CustomMeasure(Measure):
    """A user's ``function(original, pruned) -> float in [0, 1]``, per batch, averaged weighted by samples."""

    def __init__(self, head, fn: Callable, label: str):
        super().__init__(head)
        self.fn, self.label, self.total = fn, label, 0.0

    def add(self, ref, out) -> None:
        from ..errors import InputError

        n = len(next(iter(ref.values())))
        try:
            v = float(self.fn(dict(ref), dict(out)))
        except Exception as exc:
            raise InputError(f"--fidelity {self.label} failed: {type(exc).__name__}: {exc}") from None
        if not 0.0 <= v <= 1.0:
            raise InputError(f"--fidelity {self.label} returned {v}, not a value in [0, 1]")
        self.total += v * n
        self.n += n

    def result(self) -> HeadResult:
        v = self.total / max(self.n, 1)
        return HeadResult("custom", self.head.outputs, f"fidelity ({self.label})", v, 1.0 - v,
                          f"fidelity ({self.label}) {v:.4f}", 0.5)
