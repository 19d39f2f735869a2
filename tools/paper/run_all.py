"""Run the whole reproduction (issue 6) in order, two workers on the two cores, resumable.

    nohup python -m tools.paper.run_all > paper.log 2>&1 &      # all stages (the time it took: docs/BENCHMARKS.md)
    python -m tools.paper.run_all --only latency,report          # one or more stages

Stages: prune (Table 1), finetune (Table 2, seed 0), seeds (Table 2, seeds 1-2 of the Consensus and the best
single metric), curve (Table 5), robustness (Table 3), latency (Table 4, alone on the machine), report (the
tables and plot into docs/BENCHMARKS.md). Every unit's result is cached under .cache/paper/, so rerunning
after an interruption skips what is done. Worker logs: .cache/paper/logs/.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from .common import ROOT

SHARDED = {
    "prune": ["tools.paper.prune_runs"],
    "finetune": ["tools.paper.finetune_runs", "--stage", "seed0"],
    "seeds": ["tools.paper.finetune_runs", "--stage", "seeds"],
    "curve": ["tools.paper.budget_curve"],
    "robustness": ["tools.paper.robustness"],
}
SINGLE = {"latency": ["tools.paper.latency"], "report": ["tools.paper.report"]}
STAGES = ("prune", "finetune", "seeds", "curve", "robustness", "latency", "report")


def run_stage(stage: str, workers: int) -> None:
    logs = ROOT / ".cache" / "paper" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    if stage in SINGLE:
        env.pop("OMP_NUM_THREADS")
        subprocess.run([sys.executable, "-m", *SINGLE[stage]], cwd=ROOT, env=env, check=True)
    else:
        procs = []
        for k in range(workers):
            log = open(logs / f"{stage}_{k}.log", "a")
            procs.append(subprocess.Popen([sys.executable, "-m", *SHARDED[stage], "--shard", f"{k}/{workers}"],
                                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"stage {stage} failed (exit codes {codes}); see {logs}/{stage}_*.log")
    print(f"stage {stage}: {time.perf_counter() - t0:.0f} s", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages of {', '.join(STAGES)}")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    for stage in args.only.split(","):
        if stage not in STAGES:
            raise SystemExit(f"unknown stage {stage!r}; choose from {', '.join(STAGES)}")
        run_stage(stage, args.workers)


if __name__ == "__main__":
    main()
