"""``inspect``: the removable blocks (or decoder layers) of a model file, without running it
(`onnx-cprune inspect`, ``pipeline.inspect``)."""
from __future__ import annotations

import os

from .errors import InputError
from .graph.blocks import find_blocks
from .graph.flops import count_cost
from .kinds.outputs import choose_feature, output_kinds
from .graph.ir import load_model
from .graph.quant import finetune_refusal, quantized_ops
from .options import CriterionOptions

__all__ = ["inspect"]


def inspect(path: str | os.PathLike, *, unit: str = CriterionOptions.unit,
            input_shapes: dict[str, tuple[int, ...]] | None = None, task: str | None = None,
            output_kind: tuple[str, ...] = ()) -> dict:
    """The removable blocks of a model file, without running it: {model, macs, params, unit, blocks (each
    with ``macs_share``), not_removable, notes, feature (the global scope's feature tensors and why, or
    None with the reason in ``notes``), outputs (each float output's kind), finetune_refuses (why fine-tuning
    will be refused, e.g. a quantized graph, else None; also the first note)}."""
    from .llm.inspect import inspect_decoder
    from .llm.run import is_decoder, model_file

    path = model_file(path)  # an export folder: its model file
    model = load_model(path)
    if is_decoder(model):
        return inspect_decoder(path, model)
    cost = count_cost(model, input_shapes or {})
    report = find_blocks(model, macs_per_node=cost.macs_per_node, unit=unit)
    total = cost.total_macs
    blocks = []
    for b in report.blocks:
        d = b.to_json()
        d["macs_share"] = (b.macs / total) if (b.macs is not None and total) else None
        blocks.append(d)
    notes = list(cost.notes) + list(report.notes)
    refused, quantized = None, quantized_ops(model)
    if quantized:  # prune works on it; say here what fine-tuning will do, with the same line
        refused = finetune_refusal(quantized)
        notes.insert(0, f"prune removes blocks from this model; {refused}")
    try:
        feature = choose_feature(model, report.blocks, task=task).to_json()
    except InputError as exc:
        feature = None
        notes.append(f"no feature tensor: {exc}")
    return {"model": os.fspath(path), "macs": total, "params": cost.params, "weight_bytes": cost.weight_bytes,
            "unit": unit, "blocks": blocks,
            "not_removable": [n.to_json() for n in report.not_removable], "notes": notes, "feature": feature,
            "outputs": output_kinds(model, task, output_kind), "finetune_refuses": refused}

