"""The four decoders of a ``--quantize`` run, measured side by side in the same run: the original, the original
quantized, the pruned model (fine-tuned when asked) and the pruned model quantized (the one written).

Each row: held-out perplexity (``perplexity.perplexity``, nats per token exponentiated, over the same windows
for all four), parameters (``flops.count_params``: a quantized weight counts its values), bytes on disk (the
serialized model plus its external data, weights as stored: int4 half a byte), and onnxruntime throughput
(``perplexity.throughput``: batch 1, prefill and greedy decode tokens/s; the four models timed in turn
``repeats`` times, the best of each). The report
puts ``DecoderVariants.to_json()`` under the key the block path uses for its four rows (``quantize``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ..graph.flops import count_params
from ..graph.weights import all_tensors, is_external, stored_nbytes
from ..variants import ROW_NAMES
from .perplexity import perplexity, throughput
from .quantize import quantize_decoder

__all__ = ["DecoderRow", "DecoderVariants", "disk_bytes", "measure_decoder_variants", "decoder_table_lines"]


@dataclass
class DecoderRow:
    """One model of the table: perplexity on the held-out windows (None without windows), parameters, bytes
    on disk, prefill and decode tokens/s at batch 1 (None when not timed)."""

    name: str
    perplexity: float | None
    params: int
    bytes: int
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class DecoderVariants:
    """The quantized pruned decoder to write (``model``), its ``format`` and the four ``rows`` (ROW_NAMES
    order); ``windows``: held-out windows the perplexities are over; ``throughput``: the timing settings."""

    model: onnx.ModelProto
    format: str
    rows: list[DecoderRow] = field(default_factory=list)
    windows: int = 0
    throughput: dict | None = None

    def to_json(self) -> dict:
        return {"format": self.format, "written": ROW_NAMES[-1], "samples": self.windows, "kind": "decoder",
                "throughput": self.throughput, "rows": [r.to_json() for r in self.rows]}


def disk_bytes(model: onnx.ModelProto) -> int:
    """Bytes of ``model`` on disk: the serialized proto (inline tensors included) plus its external tensors as
    stored (alignment padding of the data file not counted)."""
    return model.ByteSize() + sum(stored_nbytes(t) for t in all_tensors(model) if is_external(t))


def measure_decoder_variants(original: onnx.ModelProto, pruned: onnx.ModelProto, fmt: str, windows: np.ndarray,
                             *, prompt: np.ndarray | None = None, steps: int = 32, repeats: int = 3,
                             threads: int | None = 1, batch_size: int = 8,
                             quantized: onnx.ModelProto | None = None) -> DecoderVariants:
    """Quantize ``original`` and ``pruned`` to ``fmt`` (``quantize.quantize_decoder``) and measure the four
    rows: perplexity on ``windows`` (n, seq) int64 (may be empty), throughput on ``prompt`` (seq,) token ids
    (None: not timed) with ``steps`` decode steps, the four timed in turn ``repeats`` times (best of each),
    ``threads`` intra-op threads.
    quantized: ``original`` already quantized to ``fmt``, when the caller has it."""
    models = [original, quantized if quantized is not None else quantize_decoder(original, fmt), pruned,
              quantize_decoder(pruned, fmt)]
    rows = []
    for name, m in zip(ROW_NAMES, models):
        ppl = perplexity(m, windows, batch_size=batch_size, threads=threads) if len(windows) else None
        rows.append(DecoderRow(name, ppl, count_params(m), disk_bytes(m)))
    timing = None
    if prompt is not None:  # the four in turn, ``repeats`` times (drift hits all alike), the best of each
        for _ in range(repeats):
            for row, m in zip(rows, models):
                t = throughput(m, prompt, steps=steps, repeats=2, threads=threads)  # 2: a new session's first
                row.prefill_tok_s = max(row.prefill_tok_s or 0.0, t["prefill_tok_s"])  # run is slower
                row.decode_tok_s = max(row.decode_tok_s or 0.0, t["decode_tok_s"])
        timing = {"prompt_len": int(len(prompt)), "steps": steps, "repeats": repeats, "threads": threads,
                  "batch": 1}
    return DecoderVariants(models[-1], fmt, rows, int(len(windows)), timing)


def decoder_table_lines(variants: dict) -> list[str]:
    """The four rows as aligned text lines, from ``DecoderVariants.to_json()`` (the report's ``quantize``)."""
    head = ["", "perplexity", "params", "bytes", "prefill tok/s", "decode tok/s"]
    table = [head]
    for r in variants["rows"]:
        table.append([r["name"], "" if r["perplexity"] is None else f"{r['perplexity']:.3f}", f"{r['params']:,}",
                      f"{r['bytes']:,}"] + ["" if r[k] is None else f"{r[k]:,.0f}"
                                            for k in ("prefill_tok_s", "decode_tok_s")])
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in table]
