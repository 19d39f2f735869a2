"""Time every registered metric at n = 512 samples and d in {64, 256, 2048}; print a table (seconds per call).

    python -m tools.bench.metrics [--n 512] [--dims 64 256 2048] [--classes 10] [--threads 1] [--cap 256]

Data: X = class means + low-rank structure + noise (K classes), Y = X + noise, float32 like the pooled
features the scorer passes. Each cell is the best of up to 5 calls (fewer when a call takes > 1 s). The
extra column times the alignment metrics at the largest d after ``pca_cap`` (what the scorer does).
BLAS threads default to 1 (threadpoolctl, when installed): on shared cores more threads mostly contend.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np

if __package__ in (None, ""):  # run as a file: make the repository root importable
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from onnx_consensus.metrics import available_metrics, get_metric, score
from onnx_consensus.metrics.features import pca_cap


def make_data(n: int, d: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    rank = min(64, d)
    X = (0.5 * rng.standard_normal((k, d))[labels]
         + 0.2 * rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d))
         + 0.1 * rng.standard_normal((n, d)))
    Y = X + 0.3 * rng.standard_normal((n, d))
    return X.astype(np.float32), Y.astype(np.float32), labels


def best_time(fn, budget: float = 1.0, max_repeats: int = 5) -> float:
    times = []
    while len(times) < max_repeats and sum(times) < budget:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--dims", type=int, nargs="+", default=[64, 256, 2048])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (0: library default)")
    p.add_argument("--cap", type=int, default=256, help="pca_cap width for the extra column")
    args = p.parse_args(argv)

    limits = contextlib.nullcontext()
    if args.threads > 0:
        try:
            from threadpoolctl import threadpool_limits

            limits = threadpool_limits(args.threads)
        except ImportError:
            pass
    data = {d: make_data(args.n, d, args.classes) for d in args.dims}
    dmax = max(args.dims)
    capped = pca_cap(data[dmax][0], data[dmax][1], args.cap) if dmax > args.cap else None
    headers = [f"d={d}" for d in args.dims] + ([f"d={dmax}+cap{args.cap}"] if capped else [])
    names = available_metrics()
    width = max(len(n) for n in names) + 2
    print(f"n={args.n}, K={args.classes} conditions, threads={args.threads or 'default'}; seconds per call")
    print("metric".ljust(width) + "".join(h.rjust(16) for h in headers))
    with limits:
        for name in names:
            spec = get_metric(name)
            cells = []
            for d in args.dims:
                X, Y, labels = data[d]
                cells.append(best_time(lambda: score(name, X, Y, labels)))
            if capped:
                if spec.alignment:
                    xs, ys = capped
                    cells.append(best_time(lambda: score(name, xs, ys, data[dmax][2])))
                else:
                    cells.append(None)
            row = "".join(("-" if c is None else f"{c:.4f}").rjust(16) for c in cells)
            print(name.ljust(width) + row)


if __name__ == "__main__":
    main()
