"""`onnx-cprune inspect`: the removable blocks of a model, as a table or JSON."""
from __future__ import annotations

import json

from ..options import CriterionOptions, RunOptions
from ..pipeline import inspect


def cmd_inspect(args) -> int:
    criterion = CriterionOptions.from_args(args)
    run = RunOptions.from_args(args)
    out = inspect(args.input, unit=criterion.unit, input_shapes=run.input_shapes, task=criterion.task,
                  output_kind=criterion.output_kind)
    if args.latency:
        out["latency"] = _latency(args.input, criterion.unit, run)
        for d in out["blocks"]:
            d["latency_ms"] = out["latency"]["block_ms"].get(d["id"])
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    blocks, total = out["blocks"], out["macs"]
    size = f"; {out['params']:,} parameters, {out['weight_bytes']:,} bytes of weights as stored"
    print((f"{args.input}: {len(blocks)} removable block(s); MACs {total:,}" if total is not None
           else f"{args.input}: {len(blocks)} removable block(s); MACs unknown (use --input-shape)") + size)
    lat = out.get("latency")
    if lat:
        print(f"Latency {lat['base_ms']:.3f} ms (lower quartile of alternated runs) at batch {lat['batch_size']}, "
              f"{lat['threads']} thread(s), {','.join(lat['providers'])}; a block's ms is its share of what "
              f"removing every block saves ({lat['base_ms'] - lat['floor_ms']:.3f} ms), by its own saving")
    print(f"{'#':>3}  {'stage':>5}  {'nodes':>5}  {'MACs':>12}  {'share':>6}" + (f"  {'ms':>7}  {'share':>6}"
          if lat else "") + "  id (entry -> exit)")
    for k, d in enumerate(blocks):
        macs = f"{d['macs']:,}" if d["macs"] is not None else "unknown"
        share = f"{d['macs_share']:.2%}" if d["macs_share"] is not None else "-"
        ms = (f"  {d['latency_ms']:>7.3f}  {d['latency_ms'] / lat['base_ms']:>6.2%}" if lat else "")
        print(f"{k:>3}  {d['stage']:>5}  {d['n_nodes']:>5}  {macs:>12}  {share:>6}{ms}  {d['id']}  "
              f"({d['entry']} -> {d['exit']})")
    if out["not_removable"]:
        print("\nResidual merges seen but not removable:")
        for n in out["not_removable"]:
            print(f"  {n['merge']}: {n['reason']}")
    if out.get("feature"):
        print(f"\nFeature tensor (global scope): {', '.join(out['feature']['tensors'])} ({out['feature']['reason']})")
    if out.get("outputs"):
        print("Outputs: " + ", ".join(f"{name} ({kind})" for name, kind in out["outputs"].items()))
    for note in out["notes"]:
        print(f"\nNote: {note}")
    return 0


def _latency(path: str, unit: str, run: RunOptions) -> dict:
    """The LatencyModel of the model file (``latency_model.model_latency``) as JSON, on ``run``'s providers."""
    from ..graph.ir import load_model
    from ..latency_model import model_latency
    from ..llm.run import model_file
    from ..runtime import resolve_providers, using_providers

    with using_providers(resolve_providers(run.providers)):
        return model_latency(load_model(model_file(path)), unit=unit, input_shapes=run.input_shapes,
                             threads=run.threads).to_json()
