"""How many calibration windows a decoder run takes at once.

A decoder batch's memory grows with its tokens, not with the weights: the logits are tokens x vocab floats
(512 tokens at a 32,000-token vocabulary: 65 MB) and a scoring run also returns the residual stream at every
layer boundary (tokens x hidden x (layers + 1) floats: 512 tokens of a 2048-wide, 22-layer model: 97 MB), on top
of the activations (decomposed attention: heads x seq x seq floats per window). ``BATCH_TOKENS`` bounds a batch
by tokens, so a long context takes fewer windows at once. Measured at 1.0B parameters (docs/BENCHMARKS.md,
"Decoder LLMs at scale"): 16 windows of 128 tokens at once peaked 0.3-0.7 GB above 4 at once, for no fewer CPU
seconds.
"""
from __future__ import annotations

__all__ = ["BATCH_TOKENS", "decoder_batch"]

BATCH_TOKENS = 512
"""Tokens per decoder batch (at least one window)."""


def decoder_batch(seq_len: int, limit: int | None = None) -> int:
    """Windows of ``seq_len`` tokens per batch: ``BATCH_TOKENS // seq_len`` (at least 1), at most ``limit``
    (``--batch-size``) when given."""
    n = max(1, BATCH_TOKENS // max(1, int(seq_len)))
    return min(n, limit) if limit else n
