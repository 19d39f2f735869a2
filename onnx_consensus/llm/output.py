"""Writing a pruned decoder LLM (an export folder or a model file) and its terminal summary."""
from __future__ import annotations

import os

import onnx

from ..errors import InputError
from ..graph.decoder import dummy_feed
from .deploy import deploy_lines
from .folder import prune_folder
from ..graph.weights import release_mapped_pages
from ..report import stamp


def _unknown_to_onnx(model: onnx.ModelProto) -> list[str]:
    """Operators in the default domain that onnx does not define (onnxruntime's, as genai exports use)."""
    return sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")
                   and not onnx.defs.has(n.op_type)})


def write_decoder(outcome, out_path: str | os.PathLike) -> str | None:
    """Write the pruned decoder of ``outcome`` (a ``pipeline.Outcome`` with ``decoder`` set): a folder when the
    input was a folder (configs updated, other files copied), else a model file (external data
    ``<name>.data`` when the input had it). Checked by one onnxruntime run (prefill) and by ``onnx.checker``
    unless the graph has operators onnx does not define (said in the report's ``checks``). Returns the path
    written, or None when there is nothing to write."""
    from ..io import check_output_path, save_model_atomic

    out_path = os.path.abspath(os.fspath(out_path))
    if not outcome.write:
        return None
    dec = outcome.decoder
    stamp(outcome.model, outcome.report)
    if dec.spill is not None:  # the input's weights were inline: so are the output's (streamed, ``write_inline``)
        release_mapped_pages()
    unknown = _unknown_to_onnx(outcome.model)
    checks = ["onnxruntime prefill run"]
    if dec.folder:
        prune_folder(dec.source, out_path, dec.removed, pruned=outcome.model, report=dec.layers,
                     external=outcome.external, follow_symlinks=outcome.options.data.follow_symlinks)
        checks.append("onnx.checker not run on export folders (onnxruntime operators in the default domain)"
                      if unknown else "onnx.checker not run on export folders")
    else:
        if os.path.isdir(out_path):
            raise InputError(f"output is a folder but the input is a model file: give a .onnx path ({out_path})")
        check_output_path(out_path, dec.source)
        if unknown:
            checks.append(f"onnx.checker skipped: operators it does not define ({', '.join(unknown)})")
        else:
            checks.append("onnx.checker (full)")
        save_model_atomic(outcome.model, out_path, dummy_feed(outcome.model, seq=3),
                          threads=outcome.options.run.threads, external_data=outcome.external, checker=not unknown)
    outcome.report["checks"] = checks
    outcome.report["output"] = out_path
    return out_path


def summary(report: dict) -> str:
    """The terminal summary of a decoder run."""
    ch = report["interface"]
    lines = [f"Removed {len(report['removed'])} of {ch['layers_before']} decoder layers ({report['form']} form; "
             f"{report['stop_reason']})"]
    for r in report["removed"]:
        lines.append(f"  - layer {r['index']}  ({r['id']})")
    p = report["params"]
    lines.append("")
    lines.append(f"parameters        {p['before']:>12,} -> {p['after']:,}"
                 + (f" ({(p['ratio'] - 1) * 100:+.2f}%)" if p.get("ratio") else ""))
    if report.get("weight_bytes"):
        b = report["weight_bytes"]
        lines.append(f"bytes as stored   {b['before']:>12,} -> {b['after']:,}")
    for k, v in (report.get("perplexity") or {}).items():
        if "before" in v:
            lines.append(f"perplexity ({k}, {v['windows']} windows)  {v['before']:.2f} -> {v['after']:.2f}")
        else:
            lines.append(f"perplexity ({k}, {v['windows']} windows)  -> {v['after']:.2f}")
    sp = report.get("throughput")
    if sp:
        for k in ("prefill_tok_s", "decode_tok_s"):
            lines.append(f"{k.replace('_tok_s', '')} tokens/s (onnxruntime, {sp['before']['threads']} thread(s))  "
                         f"{sp['before'][k]:.0f} -> {sp['after'][k]:.0f}")
    if ch["removed_inputs"]:
        lines.append("")
        lines.append(f"Interface change: {ch['layers_before']} -> {ch['layers_after']} KV-cache layers; inputs "
                     f"removed: {', '.join(ch['removed_inputs'])}; outputs removed: "
                     f"{', '.join(ch['removed_outputs'])}; the remaining caches are renumbered "
                     f"0..{ch['layers_after'] - 1} ({len(ch['renamed'])} renamed).")
    ft = report.get("finetune")
    if ft and ft.get("error"):
        lines.append(f"fine-tuning: {ft['error']}")
    return "\n".join(lines + deploy_lines(report))
