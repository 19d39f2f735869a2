"""The run's report: JSON with provenance, the terminal summary table, and the output model's metadata."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping

import onnx

from . import __version__
from .pruner import PruneResult

METADATA_KEY = "onnx_consensus.report"
SCHEMA_VERSION = 3
"""The JSON report's ``schema_version`` (docs/REPORT_SCHEMA.md): 1 the reports before it had one, 2 adds
``schema_version``, ``latency_target``, ``quantize`` and ``curve``, 3 one schema for block models and decoder
LLMs (``kind``, ``input_sha256`` in both; ``schema_version``, ``version``, ``seed``, ``output`` in a decoder's)."""
COMMON_KEYS = ("schema_version", "tool", "version", "kind", "input", "input_sha256", "options", "seed", "removed",
               "removed_ids", "rounds", "stop_reason", "candidates", "params", "weight_bytes", "finetune", "seconds",
               "output")
"""The keys every report has, whatever the model kind (docs/REPORT_SCHEMA.md); ``kind`` says which others."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _ratio(after, before):
    return None if not before or after is None else after / before


def build_report(result: PruneResult, *, options: Mapping, input_path: str | None = None,
                 input_sha256: str | None = None, latency: Mapping | None = None,
                 finetune: Mapping | None = None, criterion: Mapping | None = None) -> dict:
    """A JSON-able report: provenance, the removed blocks in order, MACs/params before and after,
    fidelity, the per-round scores of every candidate, and optional latency and fine-tuning results.
    ``criterion``: {"metrics": the --metrics used, "default": None when given, else which default
    ("with fine-tuning" / "without fine-tuning")}."""
    removed = []
    for r in result.removals:
        entry = r.block.to_json()
        entry.pop("nodes")
        entry["round"] = r.round
        if r.fidelity is not None:
            entry["holdout_fidelity"] = r.fidelity.to_json()
        removed.append(entry)
    removed_round = {r.block.id: r.round for r in result.removals}
    rounds = []
    for k, rnd in enumerate(result.rounds):
        d = rnd.to_json()
        for b in d["blocks"]:
            blk = result.original_blocks.by_id()[b["id"]]
            b.update(entry=blk.entry, exit=blk.exit, macs=blk.macs, removed_in_round=removed_round.get(b["id"]))
        d["round"] = k
        rounds.append(d)
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "onnx-consensus",
        "version": __version__,
        "kind": "blocks",
        "input": {"path": input_path, "sha256": input_sha256},
        "input_sha256": input_sha256,
        "options": dict(options),
        "seed": options.get("seed"),
        "candidates": [b.to_json() for b in result.original_blocks.blocks],
        "not_removable": [n.to_json() for n in result.original_blocks.not_removable],
        "removed": removed,
        "removed_ids": result.removed_ids,
        "stop_reason": result.stop_reason,
        "macs": {"before": result.macs_before, "after": result.macs_after,
                 "ratio": _ratio(result.macs_after, result.macs_before)},
        "params": {"before": result.params_before, "after": result.params_after,
                   "ratio": _ratio(result.params_after, result.params_before)},
        "weight_bytes": {"before": result.weight_bytes_before, "after": result.weight_bytes_after,
                         "ratio": _ratio(result.weight_bytes_after, result.weight_bytes_before)},
        "fidelity": result.fidelity.to_json() if result.fidelity else None,
        "feature": _feature(result),
        "collapse": result.collapse,
        "fidelity_notes": list(getattr(result, "notes", [])),
        "output_plan": getattr(result, "output_plan", None),
        "samples": {"scoring": result.score_samples, "holdout": result.holdout_samples},
        "rounds": rounds,
        "latency": dict(latency) if latency else None,
        "finetune": dict(finetune) if finetune else None,
        "criterion": dict(criterion) if criterion else None,
        "seconds": None,
        "output": None,
    }


def _feature(result: PruneResult) -> dict | None:
    """The first round's feature tensor(s) and why (global scope), or None."""
    for rnd in result.rounds:
        if rnd.feature:
            return {"tensor": rnd.feature, "reason": rnd.feature_reason}
    return None


def _fidelity_lines(fid: Mapping, tuned: bool = False) -> list[str]:
    """Fidelity in the task's terms, one line per head of the output plan ("detections kept 0.39 (11 of 28),
    score change -0.12"); reports from before the plan: agreement for class scores, cosine and relative error."""
    outs = fid.get("outputs") or []
    head = f"Fidelity{' of the fine-tuned model' if tuned else ''} on {fid['n']} hold-out samples: "
    heads = fid.get("heads") or []
    if heads:
        if len(heads) == 1:
            return [head + heads[0]["text"]]
        return [head.rstrip()] + [f"  {', '.join(h['outputs'])} ({h['kind']}): {h['text']}" for h in heads]
    if not outs:  # a report from before per-output fidelity
        agree = fid.get("agreement")
        return [head + (f"top-1 agreement {agree:.4f}, " if agree is not None else "")
                + f"mean relative output error {fid['rel_error']:.4f}"]

    def terms(o: Mapping) -> str:
        what = {"class scores": "class scores", "embedding": "embedding"}.get(o["kind"], "output")
        agree = f"top-1 agreement {o['agreement']:.4f}, " if o.get("agreement") is not None else ""
        return f"{agree}{what} cosine {o['cosine']:.4f}, mean relative error {o['rel_error']:.4f}"

    if len(outs) == 1:
        return [head + terms(outs[0])]
    return [head.rstrip()] + [f"  {o['name']} ({o['kind']}): {terms(o)}" for o in outs]


def provenance(report: Mapping) -> dict:
    """The compact part stored in the output model's metadata_props, for every model kind: the keys a block
    model's report always had, then ``kind``, ``input_sha256`` and a decoder's ``interface`` where present."""
    keys = ("tool", "version", "input", "options", "seed", "removed_ids", "macs", "params", "fidelity")
    return {**{k: report.get(k) for k in keys},
            **{k: report[k] for k in ("kind", "input_sha256", "interface") if k in report}}


def stamp(model: onnx.ModelProto, report: Mapping) -> None:
    """Store the report's provenance in ``model.metadata_props`` (replacing an earlier one)."""
    keep = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(provenance(report), sort_keys=True))


def _fmt_int(v) -> str:
    return "unknown" if v is None else f"{v:,}"


def not_improved_text(info: dict) -> str:
    """The plain statement that fine-tuning was not kept, from the fine-tuning info."""
    where = "the hold-out" if info["eval"] == "hold-out" else info["eval"]
    best = info.get("best_finetuned")
    return (f"fine-tuning did not improve the {info['metric']} on {where} ({info['eval_samples']} samples): "
            f"pruned {info['metric_before']:.4f}, best fine-tuned epoch "
            + ("n/a" if best is None else f"{best:.4f}") + ": the pruned model was written")


def summary_table(report: Mapping) -> str:
    """A plain-text summary for the terminal."""
    macs, fid = report["macs"], report.get("fidelity") or {}
    lines = _removed_lines(report)
    ft = report.get("finetune")
    rows, notes = _table_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines.append("")
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    feature = report.get("feature")
    if feature:
        lines.append("")
        lines.append(f"Feature tensor: {feature['tensor']} ({feature['reason']})")
    if notes:
        lines.append("")
        lines.extend(notes)
    if ft and ft.get("metric_after") is not None and ft.get("metric_original") is not None and macs.get("ratio"):
        gap = (ft["metric_after"] - ft["metric_original"]) * 100
        lines.append("")
        lines.append(f"The written model: eval {ft['metric']} {ft['metric_after']:.2%} against the original's "
                     f"{ft['metric_original']:.2%} ({gap:+.2f} pp) with {1 - macs['ratio']:.1%} fewer MACs")
    if fid:
        tuned = bool(ft and ft.get("best_epoch"))
        lines.append("")
        lines.extend(_fidelity_lines(fid, tuned))
    for note in report.get("fidelity_notes") or []:
        lines.append(f"Note: {note}")
    if report.get("collapse"):
        lines.append(f"Warning: {report['collapse']}")
    return "\n".join(lines + _target_and_quantize_lines(report))


def _removed_lines(report: Mapping) -> list[str]:
    """The summary's head: what was removed and why the schedule stopped, by which criterion."""
    if not report["candidates"] and report["stop_reason"].startswith("no removable block"):
        lines = [report["stop_reason"][0].upper() + report["stop_reason"][1:]]
    else:
        lines = [f"Removed {len(report['removed'])} of {len(report['candidates'])} removable blocks "
                 f"({report['stop_reason']})"]
    for r in report["removed"]:
        share = f"{r['macs']:,} MACs" if r.get("macs") is not None else "MACs unknown"
        lines.append(f"  - {r['id']}  ({share})")
    crit = report.get("criterion")
    if crit and report["removed"] and not report["options"].get("plan"):
        name = "+".join(crit["metrics"])
        lines.append(f"Ranked by --metrics {name}" + (f" (the default {crit['default']}; --metrics paper is the "
                                                      "published Consensus)" if crit.get("default") else ""))
    return lines


def _change(ratio) -> str:
    return "" if ratio is None else f"{(ratio - 1) * 100:+.2f}%"


def _table_rows(report: Mapping) -> tuple[list[tuple[str, str, str, str]], list[str]]:
    """The before/after table's rows (MACs, parameters, bytes, latency, accuracy, fine-tuning metric) and the
    fine-tuning notes printed under it."""
    macs, params, fid = report["macs"], report["params"], report.get("fidelity") or {}
    rows = [("", "before", "after", "change")]
    rows.append(("MACs", _fmt_int(macs["before"]), _fmt_int(macs["after"]), _change(macs["ratio"])))
    rows.append(("parameters", _fmt_int(params["before"]), _fmt_int(params["after"]), _change(params["ratio"])))
    wb = report.get("weight_bytes")
    if wb and wb["before"]:
        rows.append(("weights, bytes as stored", _fmt_int(wb["before"]), _fmt_int(wb["after"]),
                     _change(wb["ratio"])))
    lat = report.get("latency")
    if lat:
        for bs, v in lat.items():
            rows.append((f"latency b={bs} (ms, p50)", f"{v['before_ms']:.2f}", f"{v['after_ms']:.2f}",
                         _change(v["after_ms"] / v["before_ms"])))
    if fid.get("reference_accuracy") is not None:
        rows.append(("accuracy (hold-out)", f"{fid['reference_accuracy']:.4f}", f"{fid['accuracy']:.4f}",
                     f"{(fid['accuracy'] - fid['reference_accuracy']) * 100:+.2f} pp"))
    ft = report.get("finetune")
    notes = []
    if ft and ft.get("metric_after") is not None:
        where = "hold-out" if ft.get("eval") == "hold-out" else "eval"
        if ft.get("metric_original") is not None:
            rows.append((f"{where} {ft['metric']}: original", "", f"{ft['metric_original']:.4f}", ""))
        rows.append((f"{where} {ft['metric']}: pruned -> fine-tuned", f"{ft['metric_before']:.4f}",
                     f"{ft['metric_after']:.4f}", f"{(ft['metric_after'] - ft['metric_before']) * 100:+.2f} pp"))
        if ft.get("best_epoch") == 0:
            text = not_improved_text(ft)
            notes.append(text[0].upper() + text[1:] + ".")
        else:
            notes.append(f"Fine-tuned model written: epoch {ft['best_epoch']} of {ft['epochs']}, the best on the "
                         f"{'hold-out' if where == 'hold-out' else 'evaluation data'}.")
    if ft and ft.get("bn_stats"):
        reason = ft.get("bn_stats_reason") or ""
        hint = "" if reason.startswith("--bn-stats") else "; --bn-stats freeze|update"
        notes.append(f"BatchNormalization running statistics {ft['bn_stats']} during fine-tuning ({reason}{hint}).")
    return rows, notes


def _target_and_quantize_lines(report: Mapping) -> list[str]:
    """The summary's tail: the latency target's outcome and the --quantize table."""
    lines: list[str] = []
    lt = report.get("latency_target")
    if lt:
        goal = (f"the lower of {lt['fraction']:g} x the original's {lt['original_ms']:.3f} ms timed beside it and "
                f"{lt['target_ms']:.3f} ms from the latency model" if lt.get("fraction") is not None
                else "--target-latency-ms")
        lines += ["", f"Latency of the written model at batch {lt['batch_size']}: {lt['measured_ms']:.3f} ms measured "
                      f"against the target {lt['goal_ms']:.3f} ms ({goal}; {lt['statistic']}): "
                      + ("met" if lt["met"] else "NOT met")
                      + (f" after {len(lt['attempts'])} attempts" if len(lt["attempts"]) > 1 else "")]
    if report.get("quantize"):
        from .variants import table_lines

        q = report["quantize"]
        where = "the --eval data" if (report.get("options") or {}).get("eval") else "the hold-out"
        lines += ["", f"--quantize {q['format']}: fidelity to the original on {where} ({q.get('samples')} samples), "
                      f"the {q['written']} model written"] + ["  " + ln for ln in table_lines(q)]
    return lines
