"""Issue 24 item 5 on the tiny Llama: latency saved per perplexity point lost at decode-time targets, and the
four-row table (original, quantized, pruned, pruned + quantized) at one target.

    python -m tools.bench.llm_deploy [--folder .cache/llm/llama/genai] [--targets 0.8,0.6,0.4]
                                     [--table-target 0.6] [--formats int4,int8,fp16] [--json out.json]

Steps (all in this process, 1 onnxruntime thread): the decode time model of the original
(``llm.layer_latency.measure_layer_cost``: the original and a probe without half its layers, alternated,
medians); for each target F the layer count N (``layers_for_target``); one iterative pruning run of the default
criterion to the deepest N (``llm.prune_decoder`` on the calibration text) gives the removal order, and each
target removes its first N layers; each pruned model is timed beside the original (decode s per token, batch 1,
greedy with the KV cache after a 64-token prompt; ``meet_target``: medians of alternated rounds, one more
layer and a new timing while the target is missed, at most 3 timings) and its
perplexity measured on held-out windows of the held-out text. Then, at ``--table-target``, the four rows for each
format (``llm.variants.measure_decoder_variants``). Models from ``python -m tools.data.build_llms`` (the trained tiny
Llama and its text under .cache/llm/).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LLM = ROOT / ".cache" / "llm"


def windows_of(path: Path, folder: Path, seq: int, n: int | None) -> np.ndarray:
    from onnx_consensus.llm.text import find_tokenizer, load_text

    return load_text(path, find_tokenizer(folder, None), seq_len=seq, max_samples=n).windows


def removal_order(folder: Path, calib: Path, depth: int, max_samples: int) -> tuple[list[int], float]:
    """The default criterion's iterative removal order to ``depth`` layers, and its wall seconds."""
    from onnx_consensus.llm import prune_decoder
    from onnx_consensus.options import DataOptions, Options, OutputOptions, RunOptions, TargetOptions

    opts = Options(target=TargetOptions(remove=depth), run=RunOptions(threads=1),
                   data=DataOptions(max_samples=max_samples), output=OutputOptions(latency=False))
    t = time.perf_counter()
    out = prune_decoder(folder, calib, opts)
    return list(out.decoder.removed), time.perf_counter() - t


def run(args) -> dict:
    import onnx

    from onnx_consensus.graph.kv_surgery import remove_layers
    from onnx_consensus.llm.layer_latency import layers_for_target, measure_layer_cost, meet_target
    from onnx_consensus.llm.perplexity import perplexity
    from onnx_consensus.llm.variants import measure_decoder_variants

    folder = Path(args.folder)
    model = onnx.load(str(folder / "model.onnx"))
    held = windows_of(Path(args.heldout), folder, 128, args.heldout_windows)
    prompt = held[0, :64]
    cost = measure_layer_cost(model, prompt, rounds=args.rounds, steps=args.steps)
    targets = sorted({float(f) for f in args.targets.split(",")} | {args.table_target}, reverse=True)
    wanted = {f: layers_for_target(cost, f) for f in targets}
    depth = min(max(wanted.values()) + 2, cost.n_layers - 1)  # room for meet_target's extra layers
    order, order_s = removal_order(folder, Path(args.calib), depth, args.max_samples)
    base_ppl = perplexity(model, held, threads=1)
    rows = []
    for f in targets:
        check = meet_target(model, order, f, cost, prompt, rounds=args.rounds, steps=args.steps)
        last = check.attempts[-1]
        full, got = last["original_s"], last["measured_s"]
        ppl = perplexity(check.model, held, threads=1)
        saved_ms = (full - got) * 1e3
        n = len(check.removed)
        rows.append({"target": f, "layers_for_target": wanted[f], "layers_removed": check.removed,
                     "predicted": cost.predicted_s(n) / cost.full_s, "measured": got / full, "met": check.met,
                     "attempts": len(check.attempts), "decode_ms": [full * 1e3, got * 1e3],
                     "perplexity": [base_ppl, ppl],
                     "ms_saved_per_ppl_point": saved_ms / (ppl - base_ppl) if ppl > base_ppl else None})
        print(f"target {f}: {n} layers {check.removed}, measured {got / full:.2f} of {full * 1e3:.3f} ms, "
              f"perplexity {base_ppl:.2f} -> {ppl:.2f}", flush=True)
    table_row = next(r for r in rows if r["target"] == args.table_target)
    n = len(table_row["layers_removed"])
    pruned = remove_layers(model, order[:n])
    tables = {}
    for fmt in args.formats.split(","):
        v = measure_decoder_variants(model, pruned, fmt, held, prompt=prompt, steps=args.steps, repeats=args.rounds,
                                     threads=1)
        tables[fmt] = v.to_json()
        print(fmt, json.dumps(tables[fmt]["rows"]), flush=True)
    return {"folder": os.path.relpath(folder, ROOT), "heldout_windows": int(len(held)), "cost": cost.to_json(),
            "order": order, "order_seconds": round(order_s, 1), "targets": rows, "table_target": args.table_target,
            "table_layers": order[:n], "tables": tables, "loadavg": os.getloadavg()}


def markdown(res: dict) -> str:
    c = res["cost"]
    lines = [f"Decode time model: {c['full_s'] * 1e3:.3f} ms per token with {c['n_layers']} layers, "
             f"{c['per_layer_s'] * 1e3:.3f} ms per layer, fixed {c['fixed_s'] * 1e3:.3f} ms "
             f"(probe without {c['probe_removed']} layers: {c['probe_s'] * 1e3:.3f} ms).", "",
             "| target | layers removed | predicted | measured (ms: original / pruned) | met | perplexity "
             "| ms saved per perplexity point |", "|---:|---|---:|---:|---|---:|---:|"]
    for r in res["targets"]:
        per = "" if r["ms_saved_per_ppl_point"] is None else f"{r['ms_saved_per_ppl_point']:.4f}"
        timings = f" ({r['attempts']} timings)" if r.get("attempts", 1) > 1 else ""
        lines.append(f"| {r['target']} | {' '.join(map(str, r['layers_removed']))} | {r['predicted']:.2f} | "
                     f"{r['measured']:.2f} ({r['decode_ms'][0]:.3f} / {r['decode_ms'][1]:.3f}) | "
                     f"{'yes' if r['met'] else 'no'}{timings} | "
                     f"{r['perplexity'][0]:.2f} -> {r['perplexity'][1]:.2f} | {per} |")
    for fmt, t in res["tables"].items():
        lines += ["", f"Four rows at target {res['table_target']} (layers {' '.join(map(str, res['table_layers']))} "
                      f"removed), {fmt}, perplexity on {t['samples']} held-out windows:", "",
                  "| model | perplexity | parameters | bytes | prefill tok/s | decode tok/s |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in t["rows"]:
            lines.append(f"| {r['name']} | {r['perplexity']:.2f} | {r['params']:,} | {r['bytes']:,} | "
                         f"{r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=str(LLM / "llama" / "genai"))
    ap.add_argument("--calib", default=str(LLM / "text" / "calib.txt"))
    ap.add_argument("--heldout", default=str(LLM / "text" / "heldout.txt"))
    ap.add_argument("--heldout-windows", type=int, default=64)
    ap.add_argument("--max-samples", type=int, default=32, help="calibration windows for the removal order")
    ap.add_argument("--targets", default="0.8,0.6,0.4")
    ap.add_argument("--table-target", type=float, default=0.6)
    ap.add_argument("--formats", default="int4,int8,fp16")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--json", default=None)
    ap.add_argument("--render", default=None, help="print the markdown of a JSON written by --json and exit")
    args = ap.parse_args(argv)
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())))
        return 0
    res = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
