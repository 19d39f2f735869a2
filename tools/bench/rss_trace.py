"""Where a run's resident memory goes: ``onnx-cprune`` run in this process while a thread samples
/proc/self/status (VmRSS, RssAnon: heap and other private memory, RssFile: mapped files such as external
weights) and the main thread's innermost frames (docs/BENCHMARKS.md, "Decoder LLMs at scale", Memory). Linux only.

    python -m tools.bench.rss_trace --log /tmp/rss.log -- prune .cache/llm_scale/xl/optimum_fp32 /tmp/out \\
        --calib .cache/llm_scale/calib.txt --unit layer --remove 5 --max-samples 16 --seq-len 128 \\
        --no-latency --threads 2 -q
    MALLOC_MMAP_THRESHOLD_=1048576 python -m tools.bench.rss_trace ...   # glibc's threshold fixed from the start

Each log line: seconds, VmRSS MiB, RssAnon MiB, RssFile MiB, frames (innermost first); a line is written when
VmRSS rose by more than 50 MiB since the last sample, and once a second. The last line: the peaks.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback


def _status() -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of this process, MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) // 1024
    return out


def _sample(log, main_id: int, peaks: dict[str, int], every: float) -> None:
    t0, last, shown = time.time(), 0, -1
    while True:
        s, t = _status(), time.time() - t0
        for k, v in s.items():
            peaks[k] = max(peaks.get(k, 0), v)
        if s["VmRSS"] > last + 50 or int(t) != shown:
            frame = sys._current_frames().get(main_id)
            stack = traceback.extract_stack(frame)[-8:] if frame else []
            where = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in reversed(stack))
            log.write(f"{t:7.1f} {s['VmRSS']:6d} {s['RssAnon']:6d} {s['RssFile']:6d} {where}\n")
            log.flush()
            shown = int(t)
        last = s["VmRSS"]
        time.sleep(every)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log", required=True)
    ap.add_argument("--every", type=float, default=0.2, help="seconds between samples")
    ap.add_argument("cli", nargs=argparse.REMAINDER, help="-- then onnx-cprune's arguments")
    a = ap.parse_args(argv)
    cli = a.cli[1:] if a.cli[:1] == ["--"] else a.cli
    from onnx_consensus.cli import main as cli_main

    peaks: dict[str, int] = {}
    with open(a.log, "w") as log:
        threading.Thread(target=_sample, args=(log, threading.get_ident(), peaks, a.every), daemon=True).start()
        try:
            rc = cli_main(cli)
        finally:
            log.write(f"PEAK VmRSS {peaks.get('VmRSS')} RssAnon {peaks.get('RssAnon')} "
                      f"RssFile {peaks.get('RssFile')} MiB\n")
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
