"""What a run shows and writes: the terminal summary of either kind (``pipeline.summary``), the model (atomic,
checked, stamped with the report's provenance; a decoder LLM's as a folder or a file) and the JSON (or HTML)
report (``pipeline.write``, ``pipeline.write_report``)."""
from __future__ import annotations

import os

import numpy as np

from .errors import InputError
from .io import save_model_atomic, write_json_atomic
from .outcome import Outcome, Written
from .report import stamp, summary_table

__all__ = ["summary", "write", "write_report"]


def summary(report: dict) -> str:
    """The terminal summary of any run: ``report.summary_table`` for block models, ``llm.output.summary`` for
    decoder LLMs."""
    if report.get("kind") == "decoder":
        from .llm.output import summary as decoder_summary

        return decoder_summary(report)
    return summary_table(report)


def write(outcome: Outcome, out_path: str | os.PathLike) -> Written:
    """Write the outcome's model to ``out_path`` when it is to be written (stamped with the report's
    provenance; atomic, checked by onnx.checker and one onnxruntime run; a decoder LLM's as a folder or a
    file, ``llm.output.write_decoder``), then the report to ``options.output.report`` if set (its ``output``
    says where the model went, or None)."""
    out_path = os.fspath(out_path)
    written = Written()
    report = outcome.report
    report["output"] = None
    if outcome.decoder is not None:
        from .llm.output import write_decoder

        written.model = write_decoder(outcome, out_path)
    elif outcome.write and outcome.model is not None:
        stamp(outcome.model, report)
        try:
            save_model_atomic(outcome.model, out_path, outcome.check_feed, threads=outcome.options.run.threads,
                              external_data=outcome.external)
        except OSError as exc:
            raise InputError(f"cannot write {out_path}: {exc.strerror or exc}") from None
        written.model = report["output"] = out_path
    if outcome.options.output.report:
        written.report = write_report(report, outcome.options.output.report)
    return written


def write_report(report: dict, path: str) -> str:
    """Write the JSON report to ``path`` (atomic: ``io.write_json_atomic``); for ``.html``, the HTML report
    there and the JSON beside it (``.json``). Returns the path."""
    if path.endswith(".html"):
        import json

        from .report_html import write_html

        write_report(report, path[: -len(".html")] + ".json")
        return write_html(json.loads(json.dumps(report, default=_jsonable)), path)
    return write_json_atomic(path, report, default=_jsonable)


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
