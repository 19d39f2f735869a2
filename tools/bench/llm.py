"""Decoder-LLM benchmark for docs/BENCHMARKS.md ("Decoder LLMs"): the trained tiny Llama of tools/data/build_llms.py.

1. Held-out perplexity (heldout.txt, 128-token windows) after removing 1, 2, 4 layers chosen by the
   Consensus (8 metrics, global scope on the final hidden state), ShortGPT's Block Influence (cosine, local
   scope) and random (seeds 0, 1, 2), all iterative, scored on calib.txt; without fine-tuning and after a
   short distillation from the original through the PyTorch bridge (optimum export; 1 epoch over the
   calibration windows, AdamW; epoch picked on a fifth of the calibration windows).
2. Tokens/s of prefill (128 tokens) and decode (32 greedy steps), batch 1, 1 thread: onnxruntime on both
   exports and onnxruntime-genai on the genai export, for the Consensus's 0/1/2/4-layer removals.
3. Peak resident memory of `onnx-cprune` runs (a child process) against the model's files.

    python -m tools.bench.llm --out docs/llm_bench.json
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LLM = ROOT / ".cache" / "llm"


def main(argv=None) -> None:
    from onnx_consensus.graph.decoder import find_decoder_layers
    from onnx_consensus.graph.ir import load_model_and_layout
    from onnx_consensus.graph.kv_surgery import remove_layers
    from onnx_consensus.llm.folder import prune_folder
    from onnx_consensus.llm.perplexity import perplexity, throughput
    from onnx_consensus import (CriterionOptions, FinetuneConfig, Options, OutputOptions, RunOptions,
                                TargetOptions, prune_decoder)
    from onnx_consensus.llm.run import distill
    from onnx_consensus.llm.text import load_text

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama")
    p.add_argument("--out", type=Path)
    p.add_argument("--skip", nargs="*", default=[], help="parts to skip: quality, distill, speed, memory")
    p.add_argument("--criteria", nargs="*", default=None,
                   help="quality: only these criteria (consensus, block_influence, output_kl, random_0..2)")
    p.add_argument("--repeats", type=int, default=3, help="tokens/s: best of this many runs")
    p.add_argument("--render", nargs="+", type=Path, help="print the markdown tables of these result files")
    a = p.parse_args(argv)
    if a.render:
        print(render([json.loads(f.read_text()) for f in a.render]))
        return
    base = LLM / a.model
    res: dict = {"model": a.model, "load_start": os.getloadavg(), "cpus": os.cpu_count()}
    t0 = time.time()
    opt_dir = base / "optimum"
    model, _ = load_model_and_layout(opt_dir / "model.onnx")
    report = find_decoder_layers(model)
    tok = opt_dir / "tokenizer.json"
    calib = load_text(LLM / "text" / "calib.txt", tok, seq_len=128)
    held = load_text(LLM / "text" / "heldout.txt", tok, seq_len=128)
    res["calib_windows"], res["heldout_windows"] = calib.n_samples, held.n_samples
    res["ppl_original"] = perplexity(model, held.windows, threads=1)
    print("original ppl", res["ppl_original"], flush=True)
    criteria = {"consensus": dict(metrics=("paper",), scope="global", seed=0),
                "block_influence": dict(metrics=("cosine",), scope="local", seed=0),
                "output_kl": dict(metrics=("output_kl",), scope="global", seed=0)}
    criteria.update({f"random_{s}": dict(metrics=("random",), scope="local", seed=s) for s in range(3)})
    if a.criteria:
        criteria = {k: v for k, v in criteria.items() if k in a.criteria}
    orders = {}
    if "quality" not in a.skip:
        rows = []
        # the cheap criteria first, the Consensus (one pass per remaining layer per round) last; distillation
        # after all of them; results saved after every row
        for name in [*[c for c in criteria if c != "consensus"], *[c for c in criteria if c == "consensus"]]:
            kw = criteria[name]
            t = time.perf_counter()
            o = Options(target=TargetOptions(remove=4), criterion=CriterionOptions(**kw),
                        run=RunOptions(holdout=0.0, threads=1, progress=False), output=OutputOptions(latency=False))
            out = prune_decoder(opt_dir, calib, o)
            orders[name] = out.decoder.removed
            secs = time.perf_counter() - t
            for k in (1, 2, 4):
                pruned = remove_layers(model, out.decoder.removed[:k], report=report)
                row = {"criterion": name, "k": k, "removed": out.decoder.removed[:k],
                       "ppl": perplexity(pruned, held.windows, threads=1), "scoring_seconds_for_4": round(secs, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            res["quality"] = rows
            _save(a.out, res)
        if "distill" not in a.skip:
            train, ev = calib.split_windows(0.2, 0)
            cfg = FinetuneConfig(epochs=1, batch_size=8, optimizer="adamw", lr=3e-4, threads=1)
            for row in sorted(rows, key=lambda r: (r["criterion"] != "consensus", r["criterion"], r["k"])):
                pruned = remove_layers(model, row["removed"], report=report)
                tuned, info = distill(model, pruned, train, ev, cfg)
                row["ppl_distilled"] = perplexity(tuned, held.windows, threads=1)
                row["distill_seconds"] = info["seconds"]
                row["distill_kept"] = info["kept"]
                print(json.dumps(row), flush=True)
                _save(a.out, res)
    if "speed" not in a.skip:
        from tools.bench.llm_eval import genai_throughput

        order = orders.get("consensus") or [5, 2, 4, 3]
        speed = []
        prompt = calib.windows[0]
        with tempfile.TemporaryDirectory() as tmp:
            for k in (0, 1, 2, 4):
                row = {"k": k, "removed": order[:k]}
                for kind in ("optimum", "genai"):
                    folder = base / kind
                    if k:
                        folder = Path(tmp) / f"{kind}_{k}"
                        prune_folder(base / kind, folder, order[:k])
                    m, _ = load_model_and_layout(folder / "model.onnx")
                    row[f"{kind}_ort"] = throughput(m, prompt, steps=32, repeats=a.repeats, threads=1)
                    if kind == "genai":
                        row["genai_og"] = genai_throughput(folder, prompt_len=128, steps=32, repeats=a.repeats)
                speed.append(row)
                print(json.dumps(row), flush=True)
        res["speed"] = speed
    if "memory" not in a.skip:
        mem = []
        with tempfile.TemporaryDirectory() as tmp:
            for kind, extra in (("optimum", []), ("genai", ["--metrics", "cosine", "--scope", "local"]),
                                ("optimum", ["--metrics", "cosine", "--scope", "local"])):
                folder = base / kind
                size = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))
                before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                cmd = [sys.executable, "-m", "onnx_consensus.cli", str(folder), f"{tmp}/{kind}_{len(mem)}", "--calib",
                       str(LLM / "text" / "calib.txt"), "--remove", "2", "--no-latency", "-q", "--threads", "1",
                       *extra]
                t = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                row = {"export": kind, "criterion": " ".join(extra) or "consensus (global)", "model_bytes": size,
                       "peak_rss_kib": peak, "rss_max_so_far": peak <= before,
                       "seconds": round(time.perf_counter() - t, 1)}
                mem.append(row)
                print(json.dumps(row), flush=True)
        res["memory"] = mem
    res["load_end"] = os.getloadavg()
    res["seconds"] = round(time.time() - t0)
    _save(a.out, res)


def render(results: list[dict]) -> str:
    """Markdown tables of one or more result files (quality from those that have it, etc.)."""
    out = []
    for res in results:
        if res.get("quality"):
            out.append(f"Original: held-out perplexity {res['ppl_original']:.2f} ({res['heldout_windows']} windows of "
                       f"128 tokens); scored on {res['calib_windows']} calibration windows.\n")
            out.append("| criterion | layers removed | k=1 | k=2 | k=4 | k=1 distilled | k=2 distilled | k=4 distilled "
                       "| scoring s (4 rounds) |")
            out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
            by = {}
            for r in res["quality"]:
                by.setdefault(r["criterion"], {})[r["k"]] = r
            for name, ks in by.items():
                order = ks.get(4, ks[max(ks)])["removed"]

                def cell(k, key):
                    v = ks.get(k, {}).get(key)
                    return f"{v:.2f}" if v is not None else "-"

                out.append(f"| {name} | {' '.join(map(str, order))} | {cell(1, 'ppl')} | {cell(2, 'ppl')} | "
                           f"{cell(4, 'ppl')} | {cell(1, 'ppl_distilled')} | {cell(2, 'ppl_distilled')} | "
                           f"{cell(4, 'ppl_distilled')} | {ks[min(ks)]['scoring_seconds_for_4']:.0f} |")
            out.append("")
        if res.get("speed"):
            out.append("| layers removed | optimum ORT prefill | decode | genai ORT prefill | decode | "
                       "onnxruntime-genai prefill | decode |")
            out.append("|---|---:|---:|---:|---:|---:|---:|")
            for r in res["speed"]:
                o, g, og = r["optimum_ort"], r["genai_ort"], r["genai_og"]
                out.append(f"| {' '.join(map(str, r['removed'])) or 'none'} | {o['prefill_tok_s']:.0f} | "
                           f"{o['decode_tok_s']:.0f} | {g['prefill_tok_s']:.0f} | {g['decode_tok_s']:.0f} | "
                           f"{og['prefill_tok_s']:.0f} | {og['decode_tok_s']:.0f} |")
            out.append("")
        if res.get("memory"):
            out.append("| export | criterion | model files (MB) | peak RSS of the run (MB) | seconds |")
            out.append("|---|---|---:|---:|---:|")
            for r in res["memory"]:
                out.append(f"| {r['export']} | {r['criterion']} | {r['model_bytes'] / 1e6:.1f} | "
                           f"{r['peak_rss_kib'] * 1024 / 1e6:.0f}{'' if not r['rss_max_so_far'] else ' (<=)'} | "
                           f"{r['seconds']:.0f} |")
            out.append("")
        out.append(f"Load average {res['load_start']} at the start, {res.get('load_end')} at the end "
                   f"({res.get('cpus')} cores); {res.get('seconds')} s.\n")
    return "\n".join(out)


def _save(path, res) -> None:
    if path:
        path.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
