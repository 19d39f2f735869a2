"""`onnx-cprune bench`: onnxruntime latency of models side by side (and accuracy / agreement with --eval)."""
from __future__ import annotations

import json

from ..bench import compare_models
from ..options import RunOptions
from ..runtime import provider_names, resolve_providers, using_providers


def cmd_bench(args) -> int:
    run = RunOptions.from_args(args)
    with using_providers(resolve_providers(run.providers)) as providers:
        rows = compare_models(args.models, batch_sizes=args.batch_sizes, runs=args.runs, warmup=args.warmup,
                              threads=args.threads, spinning=True if args.spin_wait else None, data=args.data,
                              eval_data=args.eval, input_shapes=run.input_shapes)
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return 0
    n_models = len(args.models)
    if args.eval:
        for r in rows[:n_models]:
            acc = f"accuracy {r.accuracy:.4f}, " if r.accuracy is not None else ""
            print(f"{r.model}: {acc}top-1 agreement with the first model {r.agreement:.4f} "
                  f"({r.eval_samples} samples)")
    spin = "on" if rows[0].latency.spinning else "off"
    alternated = f"models alternated, intra-op spinning {spin}" if n_models > 1 else f"intra-op spinning {spin}"
    print(f"onnxruntime {','.join(provider_names(providers))}, {args.threads} intra-op thread(s), graph optimisation: all, "
          f"{args.runs} timed runs after {args.warmup} warm-up, {alternated}")
    print(f"{'batch':>5}  {'p50 ms':>9}  {'p90 ms':>9}  {'ratio':>6}  {'MACs':>13}  {'params':>10}  model")
    for r in rows:
        macs = f"{r.macs:,}" if r.macs is not None else "unknown"
        print(f"{r.latency.batch_size:>5}  {r.latency.median_ms:>9.3f}  {r.latency.p90_ms:>9.3f}  {r.ratio:>6.3f}  "
              f"{macs:>13}  {r.params:>10,}  {r.model}")
    return 0
