"""Table 4 of the reproduction: onnxruntime latency of every pruned model against the original, in the same
run, beside the MACs cut.

    python -m tools.paper.latency [--threads 2,1] [--runs 30]

For each thread count: all models (the original first, then every criterion at every level, no fine-tuning:
fine-tuning changes weights, not the graph) in one `measure_latency` call per batch size (1 and 64), so the
timed runs alternate model by model and drift hits all alike; 5 warm-up runs, median and p90 of the timed
runs, graph optimisation level "all", intra-op threads pinned. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse

import numpy as np

from .common import CONFIG, load_result, original_model, pruned_model, save_result, test_arrays


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--batch-sizes", default="1,64")
    args = ap.parse_args(argv)
    config = CONFIG
    from onnx_consensus.bench import measure_latency
    from onnx_consensus.graph.flops import count_cost

    names = ["original"] + [f"{c}-L{lv}" for c in config.criteria for lv in config.levels]
    models = [original_model(config)] + [pruned_model(c, lv, config) for c in config.criteria for lv in config.levels]
    macs = [count_cost(m).total_macs for m in models]
    x, _ = test_arrays()
    for threads in (int(t) for t in args.threads.split(",")):
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            key = f"t{threads}-b{bs}-r{args.runs}"
            if load_result("latency", key, config) is not None:
                continue
            feed = {models[0].graph.input[0].name: np.ascontiguousarray(x[:bs])}
            lat = measure_latency(models, feed, runs=args.runs, threads=threads)
            rows = [{"model": n, "macs": m, "macs_cut": 1 - m / macs[0], "median_ms": r.median_ms,
                     "p90_ms": r.p90_ms, "latency_cut": 1 - r.median_ms / lat[0].median_ms}
                    for n, m, r in zip(names, macs, lat)]
            save_result("latency", key, {"threads": threads, "batch_size": bs, "runs": args.runs,
                                         "opt_level": lat[0].opt_level, "rows": rows}, config)
            print(f"threads {threads}, batch {bs}: original {lat[0].median_ms:.2f} ms", flush=True)
            for r in rows[1:]:
                print(f"  {r['model']:<16} MACs -{r['macs_cut']:.1%}  latency -{r['latency_cut']:.1%} "
                      f"({r['median_ms']:.2f} ms)", flush=True)


if __name__ == "__main__":
    main()
