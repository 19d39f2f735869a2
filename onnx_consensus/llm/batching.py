"""How many calibration windows a decoder run takes at once.

A decoder batch's memory grows with its tokens, not with the weights: the logits are tokens x vocab floats
(2,048 tokens at a 32,000-token vocabulary: 262 MB) and a scoring run also returns the residual stream at every
layer boundary (tokens x hidden x (layers + 1) floats: 2,048 tokens of a 2048-wide, 22-layer model: 386 MB), on
top of the activations. ``BATCH_TOKENS`` bounds a batch by tokens, so a long context takes fewer windows at
once (at 2,048 tokens a window, one; a count of windows alone would have taken 16, 4 GB of logits). Smaller
batches cost CPU where the weights are unpacked per run: one forward pass of the 1.0B int4 genai export over
13 windows of 128 tokens took 28.6 CPU s 16 windows at a time, 31.7 at 8 and 39.2 at 4, peaking at 1.14, 1.05
and 0.97 GiB (``python -m tools.bench.decoder_pass``; docs/BENCHMARKS.md, "Decoder LLMs at scale").
``--batch-size`` lowers it further.
"""
from __future__ import annotations

__all__ = ["BATCH_TOKENS", "decoder_batch"]

BATCH_TOKENS = 2048
"""Tokens per decoder batch (at least one window)."""


def decoder_batch(seq_len: int, limit: int | None = None) -> int:
    """Windows of ``seq_len`` tokens per batch: ``BATCH_TOKENS // seq_len`` (at least 1), at most ``limit``
    (``--batch-size``) when given."""
    n = max(1, BATCH_TOKENS // max(1, int(seq_len)))
    return min(n, limit) if limit else n
