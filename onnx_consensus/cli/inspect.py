"""`onnx-cprune inspect`: the removable blocks of a model, as a table or JSON."""
from __future__ import annotations

import json

from ..options import CriterionOptions, RunOptions
from ..pipeline import inspect


def cmd_inspect(args) -> int:
    criterion = CriterionOptions.from_args(args)
    out = inspect(args.input, unit=criterion.unit, input_shapes=RunOptions.from_args(args).input_shapes,
                  task=criterion.task, output_kind=criterion.output_kind)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    blocks, total = out["blocks"], out["macs"]
    print(f"{args.input}: {len(blocks)} removable block(s); MACs {total:,}" if total is not None
          else f"{args.input}: {len(blocks)} removable block(s); MACs unknown (use --input-shape)")
    print(f"{'#':>3}  {'stage':>5}  {'nodes':>5}  {'MACs':>12}  {'share':>6}  id (entry -> exit)")
    for k, d in enumerate(blocks):
        macs = f"{d['macs']:,}" if d["macs"] is not None else "unknown"
        share = f"{d['macs_share']:.2%}" if d["macs_share"] is not None else "-"
        print(f"{k:>3}  {d['stage']:>5}  {d['n_nodes']:>5}  {macs:>12}  {share:>6}  {d['id']}  ({d['entry']} -> {d['exit']})")
    if out["not_removable"]:
        print("\nResidual merges seen but not removable:")
        for n in out["not_removable"]:
            print(f"  {n['merge']}: {n['reason']}")
    if out["feature"]:
        print(f"\nFeature tensor (global scope): {', '.join(out['feature']['tensors'])} ({out['feature']['reason']})")
    if out["outputs"]:
        print("Outputs: " + ", ".join(f"{name} ({kind})" for name, kind in out["outputs"].items()))
    for note in out["notes"]:
        print(f"\nNote: {note}")
    return 0
