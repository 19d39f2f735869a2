"""onnxruntime session options measured on one model: the memory arena (none, each session's own, the process-wide
shared one), optionally with another optimisation level or without weight prepacking: the "Session memory
arenas" section of docs/BENCHMARKS.md.

    python -m tools.bench.session_configs MODEL [--calib DIR] [--batch 32] [--batches 4] [--runs 3] [--live 1]
        [--configs off,own,shared] [--threads 1] [--input-shape NAME:1x3x224x224] [--seq-len 128] [--json out.json]

A config is ``ARENA[/LEVEL][/noprepack]``: ARENA one of ``off`` (``runtime.session_options(arena=False)``: each
tensor a ``malloc``), ``own`` (arena=True: the session's own arena), ``shared`` (``runtime.SHARED_ARENA``); LEVEL
one of ``runtime.LEVELS`` (default ``--level``, "all"); ``noprepack``: no packed copy of the weights. Sessions are
built by ``runtime.make_session`` from the proto as the tool loads it (``graph.ir.load_model_and_layout``), so a
model whose weights stay in external-data files gets the tool's shared-weights sessions, whose level and
prepacking ``make_session`` fixes (optimisation off, no prepacking): the arena is then the only difference.

Each config runs in a fresh child process of this script, so peaks do not mix; the configs run in the order given,
``--repeat`` times round (interleaved: drift on a shared machine hits them alike). The child loads the model and
the fixed batches (the first ``--batches`` batches of ``--batch`` samples of ``--calib``; without it, random feeds
of the declared inputs, ``bench.random_feed``, or for a decoder a prefill of ``--seq-len`` random token ids with an
empty cache, ``graph.decoder.dummy_feed``), then builds ``--live`` sessions of the model at once (as the block
scorer holds one per candidate) and runs every batch through every live session ``--runs`` times. Reported per
config: build wall and CPU seconds, CPU seconds of the runs (the process's, every thread: ``time.process_time``),
peak RSS of the child (``ru_maxrss``), and its RSS once the model and batches were loaded, before any session.
Compare CPU seconds, not wall, when others use the machine.
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
ARENAS = ("off", "own", "shared")


def parse_config(text: str) -> dict:
    """'shared/basic/noprepack' -> {'name': ..., 'arena': 'shared', 'level': 'basic', 'prepack': False};
    level None: the ``--level`` default. ValueError naming the part it does not know."""
    from onnx_consensus.runtime import LEVELS

    arena, *rest = text.split("/")
    if arena not in ARENAS:
        raise ValueError(f"config {text!r}: the arena must be one of {', '.join(ARENAS)}")
    cfg = {"name": text, "arena": arena, "level": None, "prepack": True}
    for part in rest:
        if part in LEVELS:
            cfg["level"] = part
        elif part == "noprepack":
            cfg["prepack"] = False
        else:
            raise ValueError(f"config {text!r}: {part!r} is neither a level ({', '.join(LEVELS)}) nor noprepack")
    return cfg


def _rss_mb() -> float:
    """This process's resident set now, MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _feeds(model, args: dict) -> list[dict]:
    """The fixed batches: from the calibration folder, else random (a decoder: random token ids)."""
    from onnx_consensus.bench import random_feed
    from onnx_consensus.graph.decoder import dummy_feed
    from onnx_consensus.llm.run import is_decoder

    if args["calib"]:
        from onnx_consensus import load_calibration

        data = load_calibration(args["calib"], model)
        feeds = []
        for feed in data.batches(args["batch"]):
            feeds.append({k: v.copy() for k, v in feed.items()})
            if len(feeds) == args["batches"]:
                break
        return feeds
    if is_decoder(model):
        return [dummy_feed(model, batch=args["batch"], seq=args["seq_len"], seed=k, vocab=100)
                for k in range(args["batches"])]
    shapes = {k: tuple(v) for k, v in args["input_shapes"].items()}
    return [random_feed(model, args["batch"], seed=k, input_shapes=shapes) for k in range(args["batches"])]


def child(args: dict) -> dict:
    """One config in this process (``main``'s docstring): the measured row."""
    from onnx_consensus.graph.ir import load_model_and_layout
    from onnx_consensus.runtime import SHARED_ARENA, make_session

    cfg = parse_config(args["config"])
    model, external = load_model_and_layout(args["model"])
    feeds = _feeds(model, args)
    rss_loaded = _rss_mb()
    arena = {"off": False, "own": True, "shared": SHARED_ARENA}[cfg["arena"]]
    level = cfg["level"] or args["level"]
    wall, cpu = time.perf_counter(), time.process_time()
    sessions = [make_session(model, level=level, threads=args["threads"], arena=arena, prepack=cfg["prepack"])
                for _ in range(args["live"])]
    build_wall, build_cpu = time.perf_counter() - wall, time.process_time() - cpu
    names = [[i.name for i in s.get_inputs()] for s in sessions]
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args["runs"]):
        for feed in feeds:
            for s, wanted in zip(sessions, names):
                s.run(None, {n: feed[n] for n in wanted})
    run_wall, run_cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"config": cfg["name"], "arena": cfg["arena"], "level": "disable (external weights)" if external else level,
            "prepack": cfg["prepack"] and not external, "live": args["live"], "batches": len(feeds),
            "runs": args["runs"], "threads": args["threads"], "build_s": round(build_wall, 3),
            "build_cpu_s": round(build_cpu, 3), "run_s": round(run_wall, 3), "run_cpu_s": round(run_cpu, 3),
            "rss_loaded_mb": round(rss_loaded, 1), "rss_end_mb": round(_rss_mb(), 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def measure(args: dict) -> dict:
    """Run one config in a fresh child process; its row (or {'config', 'error'} when it failed)."""
    proc = subprocess.run([sys.executable, "-m", "tools.bench.session_configs", "--child", json.dumps(args)],
                          cwd=HERE, capture_output=True, text=True)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]
        return {"config": args["config"], "error": last}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    """Markdown rows, one per measured child."""
    out = ["| config | level | prepack | live sessions | build CPU s | run CPU s | RSS loaded (MB) | peak RSS (MB) |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['config']} | failed: {r['error']} | | | | | | |")
            continue
        out.append(f"| {r['config']} | {r['level']} | {'yes' if r['prepack'] else 'no'} | {r['live']} | "
                   f"{r['build_cpu_s']:.2f} | {r['run_cpu_s']:.2f} | {r['rss_loaded_mb']:,.0f} | "
                   f"{r['peak_rss_mb']:,.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="an ONNX file (a decoder export's model file too)")
    ap.add_argument("--calib", default=None, help="calibration folder (default: random feeds)")
    ap.add_argument("--batch", type=int, default=32, help="samples per batch (a fixed-batch model: its own)")
    ap.add_argument("--batches", type=int, default=4, help="how many batches")
    ap.add_argument("--runs", type=int, default=3, help="passes over the batches")
    ap.add_argument("--live", type=int, default=1, help="sessions of the model alive at once")
    ap.add_argument("--configs", default="off,own,shared", help="comma-separated ARENA[/LEVEL][/noprepack]")
    ap.add_argument("--level", default="all", help="the level of configs that name none")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over the configs (interleaved)")
    ap.add_argument("--seq-len", type=int, default=128, help="a decoder's random prompt length")
    ap.add_argument("--input-shape", action="append", default=[], metavar="NAME:1x3x224x224",
                    help="shape of an input with dynamic non-batch dims (random feeds)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    if not a.model:
        ap.error("give a MODEL")
    from onnx_consensus.flags import input_shapes

    try:
        configs = [parse_config(c)["name"] for c in a.configs.split(",") if c]
    except ValueError as exc:
        ap.error(str(exc))
    base = {"model": os.path.abspath(a.model), "calib": a.calib and os.path.abspath(a.calib), "batch": a.batch,
            "batches": a.batches, "runs": a.runs, "live": a.live, "level": a.level, "threads": a.threads,
            "seq_len": a.seq_len, "input_shapes": input_shapes(a.input_shape)}
    rows = []
    for k in range(a.repeat):
        for c in configs:
            row = measure({**base, "config": c})
            row["round"] = k + 1
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": {**base, "configs": configs, "repeat": a.repeat}, "rows": rows}, f, indent=1)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
