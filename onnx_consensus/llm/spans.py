"""PruneMe's contiguous-span criterion (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper
Layers"): remove the ``n`` consecutive layers whose input and output differ least.

For a span starting at layer ``l``, the distance is the angular distance between the residual stream entering
layer ``l`` and the stream leaving layer ``l + n - 1``, at the last token of each window, averaged over
windows:

    d(l, n) = mean_w arccos(cos(h_l[w, -1], h_{l+n}[w, -1])) / pi        in [0, 1]

where ``h_0`` is the first layer's input and ``h_i`` the output of layer ``i - 1``. The span with the
smallest distance is removed (ties: the earlier span). One forward pass with the hidden states gives every
span of every length. PruneMe reads the states from transformers' ``output_hidden_states``, whose last entry
is after the final norm; here the last layer's exit is the residual stream before it: the two agree whenever
the final norm's weight is uniform (an RMS norm only rescales), and differ otherwise only for spans that end
at the last layer.

``stream_states`` reads the states from an ONNX model (a decoder with a KV cache, ``last_token_states``, or
any model whose residual blocks chain, given the tensor names); ``span_distances`` / ``best_span`` are pure
numpy on (samples, hidden) arrays.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..graph.instrument import with_outputs
from ..runtime import SHARED_ARENA, make_session

__all__ = ["Span", "angular_distance", "span_distances", "best_span", "stream_states", "last_token_states",
           "decoder_span"]


@dataclass(frozen=True)
class Span:
    """The best span of ``length`` consecutive layers: ``start`` (0-based layer number), ``layers`` (the
    numbers start..start+length-1), ``distance`` (its angular distance in [0, 1]) and ``distances`` (every
    start's, index = start)."""

    start: int
    length: int
    distance: float
    distances: tuple[float, ...]

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.start + self.length))

    def to_json(self) -> dict:
        return {"start": self.start, "length": self.length, "layers": self.layers, "distance": self.distance,
                "distances": list(self.distances)}


def angular_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """arccos(cosine similarity) / pi of the rows of ``a`` and ``b`` (n, d): (n,) float64 in [0, 1] (a zero row:
    cosine 0, distance 0.5)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    cos = np.divide((a * b).sum(-1), den, out=np.zeros(len(a)), where=den > 0)
    return np.arccos(np.clip(cos, -1.0, 1.0)) / np.pi


def span_distances(states: Sequence[np.ndarray], length: int) -> np.ndarray:
    """``d(l, length)`` for every start l = 0..L-length: (L - length + 1,) float64. ``states``: L + 1 arrays
    (samples, hidden), the stream before layer 0 and after each of the L layers."""
    n_layers = len(states) - 1
    if not 1 <= length <= n_layers:
        raise ValueError(f"span length must be in 1..{n_layers}, got {length}")
    return np.array([angular_distance(states[s], states[s + length]).mean() for s in range(n_layers - length + 1)])


def best_span(states: Sequence[np.ndarray], length: int, starts: Iterable[int] | None = None) -> Span:
    """The span of ``length`` layers with the smallest ``span_distances`` (ties: the earlier start); ``starts``:
    the allowed starts (default all)."""
    d = span_distances(states, length)
    allowed = sorted(set(range(len(d))) if starts is None else set(starts) & set(range(len(d))))
    if not allowed:
        raise ValueError("no allowed span start")
    start = min(allowed, key=lambda s: (d[s], s))
    return Span(start, length, float(d[start]), tuple(float(x) for x in d))


def stream_states(model: onnx.ModelProto, names: Sequence[str], feeds: Iterable[dict[str, np.ndarray]], *,
                  threads: int | None = None, token_axis: int = 1) -> list[np.ndarray]:
    """The tensors ``names`` of ``model`` at the last position of ``token_axis`` over all ``feeds`` (one
    forward each): one (samples, hidden) float64 array per name, samples concatenated across feeds."""
    sess = make_session(with_outputs(model, names), level="basic", threads=threads,
                        arena=SHARED_ARENA)
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for feed in feeds:
        for k, v in enumerate(sess.run(list(names), feed)):
            v = np.take(np.asarray(v), -1, axis=token_axis)
            parts[k].append(v.reshape(-1, v.shape[-1]).astype(np.float64))
    return [np.concatenate(p) for p in parts]


def last_token_states(model: onnx.ModelProto, windows: np.ndarray, *, batch_size: int = 8,
                      threads: int | None = None) -> list[np.ndarray]:
    """The residual stream of a decoder with a KV cache at each window's last token: L + 1 arrays
    (n_windows, hidden) float64 (layer 0's entry, then each layer's exit), ``windows`` (n, seq) int64 run as
    prefills with a zero-length cache."""
    from ..graph.decoder import FUSED, expose_residual_sums, find_decoder_layers, prefill_feed

    report = find_decoder_layers(model)
    work = expose_residual_sums(model) if report.form == FUSED else model
    if work is not model:
        report = find_decoder_layers(work)
    names = [report.layers[0].block.entry] + [layer.block.exit for layer in report.layers]
    feeds = (prefill_feed(work, windows[s:s + batch_size]) for s in range(0, len(windows), batch_size))
    return stream_states(work, names, feeds, threads=threads)


def decoder_span(model: onnx.ModelProto, windows: np.ndarray, length: int, *, batch_size: int = 8,
                 threads: int | None = None) -> Span:
    """PruneMe on a decoder with a KV cache: the ``length`` consecutive layers to remove, from one forward over
    ``windows`` (n, seq) int64. The span's numbers are positions in the stack (``find_decoder_layers``' order),
    which are the cache numbers in the exports seen (``report.layers[i].index`` maps them)."""
    return best_span(last_token_states(model, windows, batch_size=batch_size, threads=threads), length)
