"""What the checks on untrusted models cost at load (issue 22): ``graph.ir.load_model`` of each model with and
without ``graph.sanity.check_model``: CPU time of the process (``time.process_time``, not wall time: on a
shared machine wall time measures the other processes), the best of several loads.

    python -m tools.bench.load_checks [--runs 7] [MODEL ...]

Default models: the shipped ones (models/*.onnx) and the third-party corpus when fetched
(.cache/real-models/*/model.onnx, ``python -m tools.data.real_models fetch``).
"""
from __future__ import annotations

import argparse
import glob
import os
import time
from unittest import mock

from onnx_consensus.graph import ir


def _best_ms(path: str, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.process_time()
        ir.load_model(path)
        times.append((time.process_time() - t0) * 1e3)
    return min(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args(argv)
    paths = args.models or sorted(glob.glob("models/*.onnx") + glob.glob(".cache/real-models/*/model.onnx"))
    print("| model | nodes | load, checks on (CPU ms) | load, checks off (CPU ms) | checks |")
    print("|---|---:|---:|---:|---:|")
    for p in paths:
        nodes = len(ir.load_model(p).graph.node)
        on = _best_ms(p, args.runs)
        with mock.patch.object(ir, "check_model", lambda m: None):
            off = _best_ms(p, args.runs)
        name = os.path.basename(os.path.dirname(p)) if p.endswith("/model.onnx") else os.path.basename(p)
        print(f"| {name} | {nodes:,} | {on:.1f} | {off:.1f} | {on - off:+.1f} ms |")


if __name__ == "__main__":
    main()
