"""Decoder LLMs with a KV cache (optimum and onnxruntime-genai exports): depth pruning by whole decoder layers.

    from onnx_consensus import pipeline
    outcome = pipeline.run("export_dir/", "corpus.txt", options)    # the same run (and Options) as every model's
    pipeline.write(outcome, "pruned_dir/")

Modules: ``text`` (calibration / held-out text -> token windows), ``perplexity`` (held-out perplexity and
tokens/s in onnxruntime), ``scoring`` (layer scores: global on the final hidden state, local Block
Influence), ``run`` (the decoder part of ``pipeline.run``: options refused, layers chosen by
``schedule.rounds``, the report), ``layers`` (layer ids and numbers, the interface change), ``output``
(writing a folder or a model file, the terminal summary), ``folder`` (export folders: the format registry
``register_folder_format``, the model file, configs, writing a pruned folder; the genai and optimum formats in
``folder_formats``), ``quantize`` and ``variants`` (int4 / int8 / fp16 after pruning, the four rows),
``layer_latency`` (a latency target as a layer count), ``deploy`` (a run's ``--target-latency`` and
``--quantize``), ``spans`` (PruneMe's contiguous span). Layer detection
and surgery live in ``graph.decoder`` and ``graph.kv_surgery``.
"""
from __future__ import annotations

_EXPORTS = {
    "load_text": "text",
    "TextData": "text",
    "find_tokenizer": "text",
    "perplexity": "perplexity",
    "throughput": "perplexity",
    "score_layers": "scoring",
    "prune_decoder": "run",
    "write_decoder": "output",
    "FolderFormat": "folder",
    "register_folder_format": "folder",
    "is_decoder": "run",
    "DecoderOutcome": "run",
    "quantize_decoder": "quantize",
    "quantize_export": "quantize",
    "measure_decoder_variants": "variants",
    "measure_layer_cost": "layer_latency",
    "layers_for_target": "layer_latency",
    "decoder_span": "spans",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
