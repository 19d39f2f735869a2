"""Benchmark of one scoring round (issue: the Consensus criterion), for docs/BENCHMARKS.md.

    python -m tools.bench.scoring [--model models/resnet56_fmnist.onnx] [--samples 512] [--threads 2]
    python -m tools.bench.scoring --skip-schedules --repeat 3 --code /path/to/old/checkout --code .

Measures, each configuration in a fresh subprocess (so peak RSS is its own):
- a global-scope scoring round with the eight metrics of the published Consensus (``--metrics paper``,
  ``score_blocks``' default) and one with the default criterion of a prune run (``--metrics output``:
  ``output_kl`` for this classifier): wall time, split into onnxruntime and metric time;
- the floor: onnxruntime alone, same session options, running every candidate's suffix plus one full
  forward over the same batches (what any global-scope implementation must at least spend);
- peak RSS at 128 and 512 samples (memory must not grow with the samples beyond the n x d features);
- the local scope; and one-shot vs iterative schedules for 15 removals;
- the metric phase alone (the eight metrics on one round's features) in one thread and in ``--threads``
  (``scoring.score_table``'s workers), alternated ``--repeat`` times, with the code of the last ``--code``.
``--repeat N`` runs the floor and the two global rounds N times, alternated, and reports each round's
ratio to the floor measured next to it (median over the repeats): on a loaded machine only that ratio
compares. ``--code DIR`` (repeatable): import onnx_consensus from that checkout (e.g. the code before a
change), the configurations of every DIR alternated in the same repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _data(model_path: str, samples: int):
    import tempfile

    import numpy as np
    import onnx

    from onnx_consensus import load_calibration
    from tools.data.fmnist import load_fmnist, to_cifar_input

    folder = os.path.join(tempfile.gettempdir(), f"bench-calib-{samples}")
    if not os.path.exists(os.path.join(folder, "x.npy")):
        os.makedirs(folder, exist_ok=True)
        images, labels = load_fmnist("train")
        idx = np.random.default_rng(0).choice(len(images), samples, replace=False)
        np.save(os.path.join(folder, "x.npy"), to_cifar_input(images[idx]))
        np.save(os.path.join(folder, "labels.npy"), labels[idx])
    model = onnx.load(model_path)
    return model, load_calibration(folder, model)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_config(cfg: dict) -> dict:
    """One measurement, run inside the child process."""
    from onnx_consensus import CriterionOptions, RunOptions, TargetOptions, find_blocks
    from onnx_consensus.graph.instrument import expose, suffix_model
    from onnx_consensus.kinds.outputs import find_feature_tensor
    from onnx_consensus.pruner import prune
    from onnx_consensus.runtime import make_session
    from onnx_consensus import score_blocks
    from onnx_consensus.options import DEFAULT_CRITERION

    model, data = _data(cfg["model"], cfg["samples"])
    threads, bs = cfg["threads"], cfg["batch_size"]
    out: dict = dict(cfg)
    t0, c0 = time.perf_counter(), _cpu()
    if cfg["kind"] == "round":
        metrics = {"paper": None, "default": DEFAULT_CRITERION}[cfg.get("criterion", "paper")]
        kw = {"metrics": metrics} if metrics else {}  # None: score_blocks' default, the published eight
        rnd = score_blocks(model, data, scope=cfg["scope"], batch_size=bs, threads=threads, **kw)
        out.update(wall_s=time.perf_counter() - t0, ort_s=rnd.ort_seconds, metric_s=rnd.metric_seconds,
                   candidates=len(rnd.blocks))
    elif cfg["kind"] == "floor":
        blocks = find_blocks(model).blocks
        feature = find_feature_tensor(model)
        suffixes = [suffix_model(model, b, [feature]) for b in blocks]
        sessions = [make_session(s.model, level="all", threads=threads) for s in suffixes]
        full = make_session(expose(model, [feature] + [b.entry for b in blocks]), level="basic", threads=threads)
        names = [o.name for o in full.get_outputs()]
        t0, c0 = time.perf_counter(), _cpu()
        for feeds in data.batches(bs):
            values = dict(zip(names, full.run(None, feeds)))
            for sess in sessions:
                sess.run(None, {i.name: values[i.name] for i in sess.get_inputs()})
        out.update(wall_s=time.perf_counter() - t0, candidates=len(blocks))
    elif cfg["kind"] == "metrics":  # the metric phase alone on one round's features: 1 thread vs --threads
        from onnx_consensus.metrics import get_metric, resolve_metrics
        from onnx_consensus.metrics.features import make_conditions
        from onnx_consensus.scoring import collect_features, score_table

        blocks = find_blocks(model).blocks
        feats = collect_features(model, data, blocks, batch_size=bs, threads=threads)
        specs = [get_metric(m) for m in resolve_metrics(("paper",), True)]
        conditions = make_conditions(feats.predictions, feats.before[blocks[0].id], seed=0)
        tables, times = [], {}
        for _ in range(cfg["repeat"]):
            for workers in (1, threads):
                w0, u0 = time.perf_counter(), _cpu()
                tables.append(score_table(feats, specs, conditions, workers=workers))
                times.setdefault(workers, []).append([time.perf_counter() - w0, _cpu() - u0])
        c0 = _cpu() - sum(c for v in times.values() for _, c in v)  # cpu_s, like wall_s: the metric phases
        out.update(wall_s=sum(w for v in times.values() for w, _ in v), per_workers=times,
                   identical=all(t == tables[0] for t in tables))
    elif cfg["kind"] == "schedule":
        res = prune(model, data, criterion=CriterionOptions(schedule=cfg["schedule"]),
                    target=TargetOptions(remove=cfg["remove"]), run=RunOptions(batch_size=bs, threads=threads))
        f = res.fidelity
        out.update(wall_s=time.perf_counter() - t0, rounds=len(res.rounds), removed=res.removed_ids,
                   holdout_agreement=f.agreement, holdout_accuracy=f.accuracy,
                   holdout_reference_accuracy=f.reference_accuracy)
    out["cpu_s"] = _cpu() - c0  # the configuration's own part, like wall_s
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _child(cfg: dict) -> dict:
    p = subprocess.run([sys.executable, "-m", "tools.bench.scoring", "--child", json.dumps(cfg)],
                       capture_output=True, text=True, cwd=HERE)
    if p.returncode:
        sys.exit(f"configuration {cfg} failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _describe(r: dict) -> str:
    desc = r["kind"]
    if r["kind"] == "round":
        desc += f" {r['scope']}" + (f" {r.get('criterion', 'paper')}" if r["scope"] == "global" else "")
    if r["kind"] == "schedule":
        desc += f" {r['schedule']}"
    extra = ""
    if r["kind"] == "round":
        extra = f"ort {r['ort_s']:.2f} s, metrics {r['metric_s']:.2f} s"
    if r["kind"] == "metrics":
        extra = "; ".join(f"{w} thread(s): " + " / ".join(f"{a:.2f}" for a, _ in v) + " s wall, "
                          + " / ".join(f"{c:.2f}" for _, c in v) + " CPU s" for w, v in r["per_workers"].items())
        extra += f"; same scores: {r['identical']}"
    if r["kind"] == "schedule":
        extra = (f"{r['rounds']} round(s), hold-out agreement {r['holdout_agreement']:.4f}, "
                 f"accuracy {r['holdout_accuracy']:.4f} (original {r['holdout_reference_accuracy']:.4f})")
    code = f" [{r['code']}]" if r.get("code") else ""
    return (f"{desc:<26} n={r['samples']:<4} wall {r['wall_s']:8.2f} s  CPU {r['cpu_s']:7.2f} s  "
            f"peak RSS {r['peak_rss_mb']:7.0f} MB  {extra}{code}")


def _ratios(results: list[dict], samples: int) -> None:
    """Each global round's wall time over the floor measured just before it (same repeat, same code)."""
    import statistics

    for code in dict.fromkeys(r.get("code") for r in results):
        for crit in ("paper", "default"):
            pairs = [(r["wall_s"] / f["wall_s"], r["metric_s"] / r["wall_s"], r["cpu_s"] / f["cpu_s"])
                     for f, r in _pairs(results, code, crit, samples)]
            if pairs:
                where = f" [{code}]" if code else ""
                print(f"global round ({crit}) / floor = {statistics.median(p[0] for p in pairs):.2f}x "
                      f"(median of {len(pairs)}: {', '.join(f'{p[0]:.2f}' for p in pairs)}); metrics share "
                      f"{statistics.median(p[1] for p in pairs):.1%}; CPU seconds "
                      f"{statistics.median(p[2] for p in pairs):.2f}x the floor's{where}")


def _pairs(results, code, crit, samples):
    floor = None
    for r in results:
        if r.get("code") != code or r["samples"] != samples:
            continue
        if r["kind"] == "floor":
            floor = r
        elif r["kind"] == "round" and r["scope"] == "global" and r.get("criterion", "paper") == crit and floor:
            yield floor, r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(HERE, "models", "resnet56_fmnist.onnx"))
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--remove", type=int, default=15)
    ap.add_argument("--repeat", type=int, default=1, help="floor and global rounds, alternated, this many times")
    ap.add_argument("--code", action="append", default=[], metavar="DIR",
                    help="import onnx_consensus from this checkout (repeatable: alternated)")
    ap.add_argument("--skip-schedules", action="store_true")
    ap.add_argument("--json", metavar="FILE", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        cfg = json.loads(args.child)
        if cfg.get("code"):
            sys.path.insert(0, os.path.abspath(cfg["code"]))
        print(json.dumps(run_config(cfg)))
        return
    base = {"model": args.model, "threads": args.threads, "batch_size": args.batch_size, "samples": args.samples}
    codes = args.code or [None]
    configs = [{**base, "code": code, **kind} for _ in range(args.repeat) for code in codes
               for kind in ({"kind": "floor"}, {"kind": "round", "scope": "global", "criterion": "paper"},
                            {"kind": "round", "scope": "global", "criterion": "default"})]
    configs += [{**base, "code": code, **kind} for code in codes
                for kind in ({"kind": "round", "scope": "global", "criterion": "paper", "samples": 128},
                             {"kind": "round", "scope": "local"})]
    configs += [{**base, "code": code, "kind": "metrics", "repeat": args.repeat} for code in args.code[-1:] or [None]]
    if not args.skip_schedules:
        configs += [{**base, "code": code, "kind": "schedule", "schedule": s, "remove": args.remove}
                    for code in codes for s in ("one-shot", "iterative")]
    results = []
    for cfg in configs:
        results.append(_child(cfg))
        print(_describe(results[-1]), flush=True)
    print()
    _ratios(results, args.samples)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
