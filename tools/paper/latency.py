"""Table 4 of the reproduction: onnxruntime latency of every pruned model against the original, in the same
run, beside the MACs cut.

    python -m tools.paper.latency [--threads 2,1] [--runs 30]

For each thread count and batch size (1 and 64): every pruned model (each criterion at each level, no
fine-tuning: fine-tuning changes weights, not the graph) is timed against the original in its own
`measure_latency` call, the two alternated run by run so drift hits both alike; 5 warm-up runs, median and
p90 of the timed runs, graph optimisation level "all", intra-op threads pinned, and (as measure_latency
does for alternated sessions) intra-op spinning off: a spin-waiting idle session takes a core from the one
being timed. Pairs rather than all 25 models in one call keep the number of live sessions small. The
original's figure is the median over its 24 pairs. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse

import numpy as np

from .common import CONFIG, load_result, original_model, pruned_model, save_result, test_arrays
from .rows import LatencyEntry, LatencyRow


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--batch-sizes", default="1,64")
    args = ap.parse_args(argv)
    config = CONFIG
    from onnx_consensus.bench import measure_latency
    from onnx_consensus import count_cost

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
            pairs = [measure_latency([models[0], m], feed, runs=args.runs, threads=threads) for m in models[1:]]
            orig_ms = float(np.median([p[0].median_ms for p in pairs]))
            orig_p90 = float(np.median([p[0].p90_ms for p in pairs]))
            rows = [LatencyEntry("original", macs[0], 0.0, orig_ms, orig_p90, 0.0)]
            rows += [LatencyEntry(n, m, 1 - m / macs[0], p[1].median_ms, p[1].p90_ms,
                                  1 - p[1].median_ms / p[0].median_ms, p[0].median_ms)
                     for n, m, p in zip(names[1:], macs[1:], pairs)]
            save_result("latency", key, LatencyRow(threads, bs, args.runs, pairs[0][0].opt_level, rows), config)
            print(f"threads {threads}, batch {bs}: original {orig_ms:.2f} ms", flush=True)
            for r in rows[1:]:
                print(f"  {r.model:<16} MACs -{r.macs_cut:.1%}  latency -{r.latency_cut:.1%} ({r.median_ms:.2f} ms)",
                      flush=True)


if __name__ == "__main__":
    main()
