"""Quality and speed of a decoder export in onnxruntime: held-out perplexity, prefill and decode tokens/s.

Perplexity: every window (batch, seq) of token ids is run as a prefill with a zero-length KV cache;
perplexity = exp(mean over predicted tokens of -log p(next token)) in nats, over all windows (the first
token of a window is not predicted). Throughput: batch 1, a prefill of ``prompt_len`` tokens, then greedy
decode steps feeding the ``present.*`` outputs back as ``past_key_values.*``: tokens/s of each, best of
``repeats`` (wall clock).
"""
from __future__ import annotations

import math
import time

import numpy as np
import onnx

from ..graph.decoder import cache_names, prefill_feed
from ..runtime import SHARED_ARENA, make_session
from .batching import decoder_batch

LOGITS = "logits"


def logits_name(model: onnx.ModelProto) -> str:
    """The model's logits output: ``logits`` when so named, else the first output that is not a cache."""
    names = [o.name for o in model.graph.output]
    if LOGITS in names:
        return LOGITS
    cache = cache_names(model)
    presents = {q for i in range(cache.n_layers) for q in cache.present(i)} if cache else set()
    return next(n for n in names if n not in presents)


def log_likelihood(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """(sum of log p(ids[:, t+1] | logits[:, t]) in nats, number of predicted tokens) for logits (b, s, V);
    in float64 one window at a time (a (s, V) copy, not (b, s, V))."""
    total = 0.0
    for w in range(len(logits)):
        lg = logits[w, :-1].astype(np.float64)
        lg -= lg.max(-1, keepdims=True)
        logz = np.log(np.exp(lg).sum(-1))
        tgt = ids[w, 1:]
        total += float((np.take_along_axis(lg, tgt[:, None], -1)[:, 0] - logz).sum())
    return total, int(ids[:, 1:].size)


def perplexity(model: onnx.ModelProto, windows: np.ndarray, *, batch_size: int | None = None, session=None,
               threads: int | None = None) -> float:
    """Perplexity of ``model`` on token ``windows`` (n, seq) int64 (prefill, zero-length cache), ``batch_size``
    windows at a time (None: ``llm.batching.decoder_batch``). session: an onnxruntime session of ``model`` when
    already open."""
    sess = session or make_session(model, level="all", threads=threads, arena=SHARED_ARENA)
    batch_size = batch_size or decoder_batch(windows.shape[-1])
    name = logits_name(model)
    total, count = 0.0, 0
    for s in range(0, len(windows), batch_size):
        x = windows[s:s + batch_size]
        ll, n = log_likelihood(sess.run([name], prefill_feed(model, x))[0], x)
        total += ll
        count += n
    if count == 0:
        raise ValueError("no token to predict: windows need at least 2 tokens")
    return math.exp(-total / count)


def throughput(model: onnx.ModelProto, prompt: np.ndarray, *, steps: int = 32, repeats: int = 3,
               threads: int | None = 1) -> dict:
    """{"prefill_tok_s", "decode_tok_s", ...}: batch 1, a prefill of the token ids ``prompt`` (seq,), then
    ``steps`` greedy steps with the cache (best of ``repeats``)."""
    sess = make_session(model, level="all", threads=threads, arena=SHARED_ARENA)
    cache = cache_names(model)
    names = [o.name for o in sess.get_outputs()]
    back = {q: p for i in range(cache.n_layers) for p, q in zip(cache.past(i), cache.present(i))}
    lg = logits_name(model)
    x = np.asarray(prompt, np.int64).reshape(1, -1)
    prompt_len = x.shape[1]
    best_p = best_d = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        out = dict(zip(names, sess.run(None, prefill_feed(model, x))))
        best_p = min(best_p, time.perf_counter() - t)
        plen = prompt_len
        t = time.perf_counter()
        for _ in range(steps):
            tok = out[lg][:, -1:].argmax(-1).astype(np.int64)
            feed = prefill_feed(model, tok, past=plen)
            feed.update({back[q]: v for q, v in out.items() if q in back})
            out = dict(zip(names, sess.run(None, feed)))
            plen += 1
        best_d = min(best_d, time.perf_counter() - t)
    return {"prefill_tok_s": round(prompt_len / best_p, 1), "decode_tok_s": round(steps / best_d, 1),
            "prompt_len": prompt_len, "steps": steps, "threads": threads}
