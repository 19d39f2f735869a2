"""The HTML report (``--report run.html``): one self-contained file rendered from the JSON report alone
(the JSON is written beside it), with no script, no stylesheet or image from elsewhere: inline CSS and SVG
charts drawn by ``svg``.

Sections: the run's summary table (the terminal summary, ``report.summary_table``), the blocks removed, the
removal curve (fidelity or accuracy against MACs and against measured latency, ``trajectory``), the latency
target, the four rows of ``--quantize``, every candidate's scores in every round, and the provenance.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from html import escape

from .report import summary_table
from .svg import dot_chart, line_chart

__all__ = ["render", "write_html"]

CSS = """body{font-family:sans-serif;margin:24px;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}pre{background:#f7f7f7;
padding:10px;white-space:pre-wrap;font-size:12px}.charts{display:flex;flex-wrap:wrap;gap:12px}code{font-size:12px}"""


def _table(head: list[str], rows: list[list], numeric_from: int = 1) -> str:
    th = "".join(f"<th>{escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td{" class=n" if k >= numeric_from else ""}>{escape(_cell(c))}</td>'
                                    for k, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _removed(report: Mapping) -> str:
    rows = [[k + 1, r["id"], r.get("stage"), r.get("macs"), r.get("round")] for k, r in enumerate(report["removed"])]
    if not rows:
        return "<p>No block removed.</p>"
    return _table(["#", "block id", "stage", "MACs", "round"], rows, numeric_from=2)


def _curve(report: Mapping) -> str:
    curve = report.get("curve")
    if not curve:
        return "<p>No removal curve (nothing removed).</p>"
    use_acc = all(p.get("accuracy") is not None for p in curve)
    name = "hold-out accuracy" if use_acc else f"hold-out {curve[0]['measure'][0]} with the original"

    def y(p):
        return p["accuracy"] if use_acc else p["measure"][1]

    def tip(p):
        macs = f"; MACs {p['macs']:,}" if p["macs"] is not None else ""
        last = f" (last: {p['id']})" if p["id"] else " (original)"
        return f"{p['removed']} removed{last}; {name} {y(p):.4f}{macs}"
    charts = [line_chart({name: [(p["macs"], y(p), tip(p)) for p in curve]}, title=f"{name} against MACs",
                         xlabel="MACs", ylabel=name)]
    if any(p.get("latency_ms") is not None for p in curve):
        charts.append(line_chart({name: [(p["latency_ms"], y(p), tip(p)) for p in curve]},
                                 title=f"{name} against latency", xlabel="latency (ms, measured)", ylabel=name))
    rows = [[p["removed"], p["id"] or "(original)", p["macs"], p["latency_ms"], y(p)] for p in curve]
    return (f'<div class="charts">{"".join(charts)}</div>'
            + _table(["removed", "last block removed", "MACs", "latency ms", name], rows, numeric_from=2))


def _rounds(report: Mapping) -> str:
    out = []
    for rnd in report["rounds"]:
        blocks = sorted(rnd["blocks"], key=lambda b: next((k for k, c in enumerate(report["candidates"])
                                                           if c["id"] == b["id"]), 0))
        removed_here = [b["id"] for b in blocks if b.get("removed_in_round") == rnd["round"]]
        chart = dot_chart([(f"{b['id']}: rank sum {b['rank_sum']:g}", b["rank_sum"], b["id"] in removed_here)
                           for b in blocks], title=f"round {rnd['round']}: rank sum per candidate (red: removed)",
                          ylabel="rank sum (low = least important)")
        metrics = rnd["metrics"]
        rows = [[b["id"], b["rank_sum"], *[b["scores"].get(m) for m in metrics], b.get("macs"),
                 "removed" if b["id"] in removed_here else ""] for b in sorted(blocks, key=lambda b: b["rank_sum"])]
        out.append(f"<h3>Round {rnd['round']}</h3>{chart}<details><summary>scores of the {len(blocks)} candidates"
                   f"</summary>{_table(['block', 'rank sum', *metrics, 'MACs', ''], rows)}</details>")
    return "".join(out) or "<p>No scoring round (a replayed plan, or nothing to score).</p>"


def _quantize(report: Mapping) -> str:
    q = report.get("quantize")
    if not q:
        return "<p>No quantization (<code>--quantize int8|int4|fp16</code>).</p>"
    batches = list(q["rows"][0]["latency_ms"]) if q["rows"] else []
    rows = [[r["name"], r["fidelity"].get("agreement"), r["fidelity"].get("cosine"), r["accuracy"], r["macs"],
             r["bytes"], *[r["latency_ms"][b] for b in batches]] for r in q["rows"]]
    where = "the --eval data" if (report.get("options") or {}).get("eval") else "the hold-out"
    return (f"<p>Format <b>{escape(q['format'])}</b>; the {escape(q['written'])} model is the one written. Fidelity "
            f"to the original on {where} ({q.get('samples')} samples).</p>"
            + _table(["model", "top-1 agreement", "cosine", "accuracy", "MACs", "bytes",
                      *[f"p50 ms, batch {b}" for b in batches]], rows))


def _latency_target(report: Mapping) -> str:
    lt = report.get("latency_target")
    if not lt:
        return "<p>No latency target (<code>--target-latency F</code>).</p>"
    rows = [[k + 1, a["removed"], a["predicted_ms"], a["measured_ms"], a["original_ms"], a["goal_ms"]]
            for k, a in enumerate(lt["attempts"])]
    return (f"<p>Measured <b>{lt['measured_ms']:.3f} ms</b> against the target {lt['goal_ms']:.3f} ms at batch "
            f"{lt['batch_size']} ({escape(lt['statistic'])}): <b>{'met' if lt['met'] else 'not met'}</b>; choice "
            f"<code>{escape(lt['choice'])}</code>.</p>"
            + _table(["attempt", "blocks removed", "predicted ms", "measured ms", "original ms", "goal ms"], rows))


def _provenance(report: Mapping) -> str:
    keys = ("schema_version", "tool", "version", "input", "output", "seed", "criterion", "seconds", "options")
    return "<pre>" + escape(json.dumps({k: report.get(k) for k in keys}, indent=1, default=str)) + "</pre>"


def render(report: Mapping) -> str:
    """The HTML document of a JSON report (``report.build_report`` plus what the run added)."""
    name = (report.get("input") or {}).get("path") or "model"
    sections = [("Summary", f"<pre>{escape(summary_table(report))}</pre>"), ("Blocks removed", _removed(report)),
                ("Fidelity against MACs and latency, removal by removal", _curve(report)),
                ("Latency target", _latency_target(report)),
                ("Original, quantized, pruned, pruned + quantized", _quantize(report)),
                ("Scores of every candidate, round by round", _rounds(report)), ("Provenance", _provenance(report))]
    body = "".join(f"<h2>{escape(t)}</h2>{html}" for t, html in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>onnx-cprune: {escape(name)}</title>'
            f"<style>{CSS}</style></head><body><h1>onnx-cprune report: {escape(name)}</h1>{body}</body></html>\n")


def write_html(report: Mapping, path: str) -> str:
    """Write ``render(report)`` to ``path`` (atomic: ``io.write_text_atomic``). Returns the path."""
    from .io import write_text_atomic

    return write_text_atomic(path, render(report))
