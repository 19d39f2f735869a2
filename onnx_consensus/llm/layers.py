"""Decoder layers named by the user (``--only``, ``--exclude``, ``--plan``: layer ids or numbers) and the
interface change their removal makes (the caches of removed layers go, the others are renumbered)."""
from __future__ import annotations

import onnx

from ..errors import InputError
from ..graph.decoder import DecoderReport
from ..schedule import allowed_ids


def layer_numbers(values, report: DecoderReport) -> set[int]:
    """--only/--exclude/--plan entries (layer ids, i.e. exit tensor names, or layer numbers) -> numbers."""
    by_id = report.by_id()
    out = set()
    for v in values:
        if v in by_id:
            out.add(by_id[v].index)
        elif str(v).isdigit() and int(v) in report.by_index():
            out.add(int(v))
        else:
            raise InputError(f"{v!r} is not a decoder layer of this model (ids: {', '.join(by_id)}; or numbers "
                             f"0..{len(by_id) - 1})")
    return out


def allowed_layers(report: DecoderReport, target) -> tuple[set[int], int]:
    """(the layer numbers ``--only``/``--exclude`` allow, how many layers may go at most: those allowed, with
    ``--keep-per-stage`` K layers (at least 1) kept of the one stack). ``target``: the run's TargetOptions."""
    n = len(report.layers)
    allowed = allowed_ids(range(n), layer_numbers(target.only, report), layer_numbers(target.exclude, report))
    return allowed, min(len(allowed), n - max(target.keep_per_stage, 1))


def plan_layers(plan, report: DecoderReport) -> list[int]:
    """A ``--plan``'s entries (ids or numbers), in order -> layer numbers."""
    by_id = report.by_id()
    out = []
    for v in plan:
        if v in by_id:
            out.append(by_id[v].index)
        else:
            (i,) = layer_numbers([v], report)
            out.append(i)
    return out


def interface_change(model: onnx.ModelProto, report: DecoderReport, removed) -> dict:
    """{"removed_inputs", "removed_outputs", "renamed" {old: new}}: the caches of removed layers go, the others
    are renumbered 0..k-1 in stack order."""
    cache = report.cache
    chosen = set(removed)
    kept = [i for i in range(cache.n_layers) if i not in chosen]
    renamed = {}
    for new, old in enumerate(kept):
        for a, b in zip(cache.past(old) + cache.present(old), cache.past(new) + cache.present(new)):
            if a != b:
                renamed[a] = b
    gone = [i for i in range(cache.n_layers)][len(kept):]
    return {"removed_layer_caches": [t for i in sorted(chosen) for t in cache.past(i) + cache.present(i)],
            "removed_inputs": [p for i in gone for p in cache.past(i)],
            "removed_outputs": [q for i in gone for q in cache.present(i)],
            "renamed": renamed, "layers_before": cache.n_layers, "layers_after": len(kept)}
