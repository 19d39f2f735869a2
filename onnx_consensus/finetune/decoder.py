"""A decoder LLM's distillation (`prune --finetune-epochs` on a decoder): the pruned decoder learns the
original's next-token distributions (KL divergence of the softened logits, every position of every window) on
the calibration windows through the PyTorch bridge; the best of {pruned, each epoch} by held-out perplexity is
kept (``job.tune``)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx

from .results import DistillReport

__all__ = ["distill"]


def distill(original: onnx.ModelProto, pruned: onnx.ModelProto, train_windows: np.ndarray,
            eval_windows: np.ndarray, config, *, threads: int | None = None,
            progress: bool = False) -> tuple[onnx.ModelProto, DistillReport]:
    """Distil ``pruned`` from ``original`` on ``train_windows`` (n, seq) int64; the epoch with the lowest
    perplexity on ``eval_windows`` is kept (the model as given when no epoch lowers it). Default optimiser for
    LLMs: AdamW, lr 1e-4 (``--optimizer``/``--lr`` override). Returns (model, report). Raises FinetuneError
    (one line), naming the fused onnxruntime operators the bridge cannot train (genai exports)."""
    from ..bridge import check_supported
    from ..errors import UnsupportedOperatorError
    from ..graph.decoder import prefill_feed
    from ..llm.perplexity import perplexity
    from .checks import require_torch
    from .epochs import window_epochs
    from .job import tune

    require_torch()
    try:
        check_supported(pruned)
    except UnsupportedOperatorError as exc:
        fused = any(n.domain == "com.microsoft" for n in pruned.graph.node)
        raise UnsupportedOperatorError(
            f"cannot fine-tune this export: {exc}" + (
                "; these fused onnxruntime operators are not trainable through the bridge: fine-tune the "
                "optimum export of the model (decomposed attention) instead" if fused else "")) from None

    def minus_perplexity(m: onnx.ModelProto) -> float:  # the best-of measure: higher is better
        return -perplexity(m, eval_windows, threads=threads)

    cfg = config
    if config.lr is None and config.optimizer == "sgd":  # the image recipe's SGD default does not suit LLMs
        cfg = replace(config, optimizer="adamw", lr=1e-4)
    elif config.lr is None:
        cfg = replace(config, lr=1e-4)
    batches = window_epochs(train_windows, cfg.batch_size, cfg.seed, lambda w: prefill_feed(original, w))
    rec = tune(pruned, batches, teacher=original, config=cfg, select=minus_perplexity, progress=progress,
               distill_outputs=[original.graph.output[0].name])  # the logits, not the KV caches
    res = rec.result
    return rec.model, DistillReport(epochs=cfg.epochs, train_windows=int(len(train_windows)), optimizer=cfg.optimizer,
                                    lr=cfg.lr, max_steps=cfg.max_steps, perplexity_before=-rec.before,
                                    perplexity_after=-rec.after, best_epoch=res.best_epoch,
                                    seconds=round(res.seconds, 2), history=res.history)
