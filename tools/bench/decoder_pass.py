"""One forward pass of a decoder export over the scored calibration windows, as the decoder scorer runs it, for
several batch sizes and memory arenas (docs/BENCHMARKS.md, "Decoder LLMs at scale": ``llm.batching`` and
``runtime.SHARED_ARENA`` were chosen from these figures). Each configuration runs in its own child process:
CPU seconds of the pass (after a warm-up run), and the child's peak RSS.

    python -m tools.bench.decoder_pass .cache/llm_scale/xl/genai_int4 --batches 4,8,16 --arenas shared
    python -m tools.bench.decoder_pass .cache/llm_scale/xl/optimum_fp32 --batches 16 --arenas off,own,shared

The windows: ``--calib`` (default the llm_scale corpus) cut as a prune run cuts them (``--max-samples 16
--seq-len 128``, the default hold-out); the session: the scorer's (level basic, 2 threads, weights shared from
their memory map, no prepacking), with the arena named (off: ``arena=False``; own: the session's own arena;
shared: ``runtime.SHARED_ARENA``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CALIB = ROOT / ".cache" / "llm_scale" / "calib.txt"
ARENAS = {"off": "False", "own": "True", "shared": "SHARED_ARENA"}

CHILD = r"""
import json, resource, sys, time
from onnx_consensus import Options
from onnx_consensus.graph.decoder import prefill_feed
from onnx_consensus.graph.ir import load_model
from onnx_consensus.llm.folder import model_file
from onnx_consensus.llm.spill import spill_weights
from onnx_consensus.llm.text import find_tokenizer, load_text
from onnx_consensus.runtime import SHARED_ARENA, SHARE_WEIGHTS_BYTES, make_session
from onnx_consensus.llm.perplexity import logits_name
folder, calib, batch, arena = sys.argv[1], sys.argv[2], int(sys.argv[3]), %(arena)s
data = load_text(calib, find_tokenizer(folder, None), seq_len=128, max_samples=16)
windows, _ = data.split_windows(Options().run.holdout, Options().criterion.seed)
model = load_model(model_file(folder))
model, spill = spill_weights(model, SHARE_WEIGHTS_BYTES)  # inline weights mapped from a file, as a prune run does
sess = make_session(model, level="basic", threads=2, arena=arena)
lg = logits_name(model)
feeds = [prefill_feed(model, windows[s:s + batch]) for s in range(0, len(windows), batch)]
sess.run([lg], prefill_feed(model, windows[:1, :8]))  # warm-up
c0, t0 = time.process_time(), time.perf_counter()
for f in feeds:
    sess.run([lg], f)
print(json.dumps({"cpu_s": round(time.process_time() - c0, 2), "wall_s": round(time.perf_counter() - t0, 2),
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "windows": int(len(windows))}))
"""


def measure(folder: str, batch: int, arena: str, calib: str = str(CALIB)) -> dict:
    """One configuration in a fresh interpreter: {"cpu_s", "wall_s", "peak_rss", "windows"}."""
    out = subprocess.run([sys.executable, "-c", CHILD % {"arena": ARENAS[arena]}, folder, calib, str(batch)],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a decoder export folder")
    p.add_argument("--batches", default="4,16", help="windows per batch, comma-separated")
    p.add_argument("--arenas", default="shared", help="off, own, shared (comma-separated)")
    p.add_argument("--calib", default=str(CALIB))
    p.add_argument("--repeat", type=int, default=1, help="runs of each configuration (interleaved)")
    p.add_argument("--json", help="append the rows to this JSON-lines file")
    a = p.parse_args(argv)
    rows = []
    for _ in range(a.repeat):
        for arena in a.arenas.split(","):
            for batch in (int(b) for b in a.batches.split(",")):
                r = {"model": Path(a.folder).name, "batch": batch, "arena": arena, **measure(a.folder, batch, arena,
                                                                                             a.calib)}
                rows.append(r)
                print(f"{r['model']:>14} batch {batch:>3} arena {arena:>6}: {r['cpu_s']:7.2f} CPU s "
                      f"{r['wall_s']:7.2f} s  peak {r['peak_rss'] / 2**30:.2f} GiB", flush=True)
                if a.json:
                    with open(a.json, "a") as f:
                        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
