"""What pruning a decoder LLM costs at scale (issues 23 and 25): Llama-shaped random-weight models at three
sizes, exported by the onnxruntime-genai builder (fp32 with external data, and int4) and by optimum-onnx (fp32),
pruned by `--unit layer --remove N` (25% of the layers) with three criteria, each measured against the floor
(one onnxruntime forward pass over the same scored calibration tokens, measured in the same run) and against
what a user would run instead (ShortGPT's Block Influence and PruneMe's angular distance in PyTorch with
transformers, one forward with hidden states).

    python -m tools.bench.llm_scale build [--sizes s,m,l]       # models under .cache/llm_scale/ (idempotent)
    python -m tools.bench.llm_scale optimum-env                 # .cache/venv-optimum (pip: network, once)
    python -m tools.bench.llm_scale build --exporter optimum [--sizes s,m,xl]   # .../<size>/optimum_fp32
    python -m tools.bench.llm_scale run [--sizes s,m] [--precisions fp32,int4] [--criteria default,paper,bi]
                                        [--exporter genai|optimum] [--code DIR] [--json out.jsonl]
    python -m tools.bench.llm_scale table out.jsonl [more.jsonl ...] [--write docs/BENCHMARKS.md]
    python -m tools.bench.llm_scale quality [--json out.jsonl]  # --prescreen K vs the exact criterion, tiny Llama

Sizes (as in issue 25; vocabulary 2000, GQA with 4x fewer KV heads, head size 64, SwiGLU 2.75x):
``s`` hidden 512 / 8 layers (25M parameters), ``m`` 1024 / 12 (145M), ``l`` 2048 / 16 (728M), ``xl`` 2048 / 22
(1.0B; fp32 4.0 GB, built only when asked: ``build --sizes xl``).
Every prune run is a child process (``python -m onnx_consensus prune``, from ``--code``: default this
checkout; give another checkout to measure other code on the same models): wall time, CPU seconds (user +
system) and peak RSS from ``os.wait4``. Options: ``--max-samples 16 --seq-len 128 --no-latency --threads 2``
(13 windows scored, 1,664 tokens). The floor and the PyTorch baselines run in child processes too.

optimum exports (``--exporter optimum``: ``optimum-cli export onnx --task text-generation-with-past
--no-post-process``, fp32, as ``tools/data/build_llms.py`` makes them; external data past 2 GB, where optimum
stores even a 128-byte ``Constant`` in ``model.onnx_data``) are made from the same Hugging Face checkpoint
(``<size>/hf``, the same random weights) in a separate virtualenv: optimum-onnx 0.1.0 needs transformers < 4.58,
which the ``llm`` extra's genai builder does not run with. ``optimum-env`` makes it (``.cache/venv-optimum``: the
installed torch's version, then this checkout's ``llm-optimum`` extra, from the package index); ``build
--optimum-python`` names another interpreter that has them. The benchmark itself never downloads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "llm_scale"
VOCAB = 2000  # not 2048: with vocab == hidden the genai builder 0.18 takes a square projection for the LM head
SIZES = {"s": (512, 8), "m": (1024, 12), "l": (2048, 16), "xl": (2048, 22)}
CRITERIA = {"default": [], "paper": ["--metrics", "paper"], "bi": ["--metrics", "cosine", "--scope", "local"],
            "angular": ["--metrics", "angular", "--scope", "local"]}
EXPORTERS = ("genai", "optimum")
OPTIMUM_PYTHON = ROOT / ".cache" / "venv-optimum" / "bin" / "python"
COMMON = ["--unit", "layer", "--max-samples", "16", "--seq-len", "128", "--no-latency",
          "--threads", "2"]


def config(size: str) -> dict:
    """The LlamaConfig keywords of a size."""
    hidden, layers = SIZES[size]
    heads = hidden // 64
    return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), max_position_embeddings=512,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, **{f"w{i}": i + 1 for i in range(VOCAB - 1)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>", pad_token="<s>",
                            unk_token="<s>").save_pretrained(out)


def optimum_env(venv: Path = OPTIMUM_PYTHON.parents[1]) -> Path:
    """Make the virtualenv that optimum exports are built in (pip, from the package index): torch at the version
    installed here, then this checkout with its ``llm-optimum`` extra (optimum-onnx, transformers < 4.58; the
    project's base dependencies bring onnxruntime, which optimum's export needs to fix its dynamic axes).
    Returns its python."""
    import torch

    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"{ROOT}[llm-optimum]"], check=True)
    return py


def build_optimum(size: str, python: Path = OPTIMUM_PYTHON) -> Path:
    """``CACHE/<size>/optimum_fp32``: optimum-onnx's ``text-generation-with-past`` export (fp32) of ``<size>/hf``
    (made by ``build`` first), by ``python`` (an interpreter with optimum-onnx: ``optimum_env``), with the
    checkpoint's tokenizer files beside it (optimum copies none for this tokenizer)."""
    import shutil

    base = build(size, ())
    dst = base / "optimum_fp32"
    if (dst / "model.onnx").exists():
        return dst
    if not Path(python).exists():
        raise SystemExit(f"no optimum environment at {python}: run `python -m tools.bench.llm_scale optimum-env` "
                         "or give --optimum-python")
    tmp = base / "tmp_optimum_fp32"
    shutil.rmtree(tmp, ignore_errors=True)
    r = subprocess.run([str(python), "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model",
                        str(base / "hf"), "--task", "text-generation-with-past", "--no-post-process", str(tmp)],
                       capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"})
    if r.returncode or not (tmp / "model.onnx").exists():
        raise RuntimeError(f"optimum export of {size} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if not (tmp / f).exists():
            shutil.copy(base / "hf" / f, tmp / f)
    tmp.rename(dst)
    return dst


def build(size: str, precisions=("fp32", "int4")) -> Path:
    """``CACHE/<size>/{hf,genai_fp32,genai_int4}`` and ``CACHE/calib.txt`` (random words: 16 windows of 128)."""
    import shutil

    base = CACHE / size
    calib = CACHE / "calib.txt"
    if not calib.exists():
        import numpy as np

        CACHE.mkdir(parents=True, exist_ok=True)
        calib.write_text(" ".join(f"w{i}" for i in np.random.default_rng(0).integers(0, VOCAB - 1, 16 * 128 + 64)))
    hf = base / "hf"
    if not (hf / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**config(size), initializer_range=0.05)).eval()
        model.save_pretrained(hf, safe_serialization=True)
        _tokenizer(hf)
        del model
    for p in precisions:
        dst = base / f"genai_{p}"
        if (dst / "genai_config.json").exists():
            continue
        tmp = base / f"tmp_{p}"
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
                        "-p", p, "-e", "cpu", "-c", str(base / "work")], check=True, capture_output=True)
        shutil.rmtree(base / "work", ignore_errors=True)
        tmp.rename(dst)
    return base


def _child(cmd: list[str], cwd: Path) -> dict:
    """Run ``cmd``; its wall seconds, CPU seconds (user + system), peak RSS (bytes), return code, last output."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "2"})
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        text = out.read().decode(errors="replace")
    return {"wall_s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "peak_rss": ru.ru_maxrss * 1024,
            "rc": os.waitstatus_to_exitcode(status), "tail": text[-600:]}


FLOOR = r"""
import json, sys, time
import numpy as np
from onnx_consensus.llm.text import load_text, find_tokenizer
from onnx_consensus.graph.decoder import prefill_feed
from onnx_consensus.graph.ir import load_model
from onnx_consensus import Options
import onnxruntime as ort
folder, calib = sys.argv[1], sys.argv[2]
o = Options()
data = load_text(calib, find_tokenizer(folder, None), seq_len=128, max_samples=16)
windows, _ = data.split_windows(o.run.holdout, o.criterion.seed)
so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.inter_op_num_threads = 1
sess = ort.InferenceSession(folder + "/model.onnx", so, providers=["CPUExecutionProvider"])
model = load_model(folder + "/model.onnx", load_external_data=False)
feeds = [prefill_feed(model, windows[s:s + 16]) for s in range(0, len(windows), 16)]
sess.run(["logits"], prefill_feed(model, windows[:1, :8]))  # warm-up
t0 = time.perf_counter(); c0 = time.process_time()
for f in feeds:
    sess.run(["logits"], f)
print(json.dumps({"floor_s": time.perf_counter() - t0, "floor_cpu_s": time.process_time() - c0,
                  "windows": int(len(windows)), "tokens": int(windows.size)}))
"""

TORCH = r"""
import json, sys, time
import numpy as np, torch
from transformers import AutoModelForCausalLM
from onnx_consensus.llm.text import load_text, find_tokenizer
from onnx_consensus import Options
hf, folder, calib, span = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(2)
o = Options()
data = load_text(calib, find_tokenizer(folder, None), seq_len=128, max_samples=16)
windows, _ = data.split_windows(o.run.holdout, o.criterion.seed)
t_load = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
t0 = time.perf_counter(); c0 = time.process_time()
sums = spans = None
with torch.no_grad():
    for s in range(0, len(windows), 16):
        hs = model(torch.from_numpy(windows[s:s + 16]), output_hidden_states=True).hidden_states
        cos = torch.stack([torch.nn.functional.cosine_similarity(a, b, dim=-1).flatten()
                           for a, b in zip(hs[:-1], hs[1:])])  # (layers, tokens): layer i's entry vs exit
        part = torch.stack([(1 - cos).sum(1), torch.arccos(cos.clamp(-1, 1)).sum(1) / np.pi])
        sums = part if sums is None else sums + part
        # PruneMe: the angle between layer l's input and layer l+span-1's output, at each window's last token
        last = torch.stack([torch.arccos(torch.nn.functional.cosine_similarity(
            hs[l][:, -1], hs[l + span][:, -1], dim=-1).clamp(-1, 1)).sum() / np.pi for l in range(len(hs) - span)])
        spans = last if spans is None else spans + last
bi, ang = (sums / windows.size).tolist()
best = int(torch.argmin(spans))
print(json.dumps({"torch_s": time.perf_counter() - t0, "torch_cpu_s": time.process_time() - c0,
                  "load_s": t0 - t_load, "bi_order": [int(i) for i in np.argsort(bi)],
                  "angular_order": [int(i) for i in np.argsort(ang)],
                  "pruneme_span": list(range(best, best + span))}))
"""


def _json_child(code: str, args: list[str]) -> dict:
    r = _child([sys.executable, "-c", code, *args], ROOT)
    if r["rc"] != 0:
        raise RuntimeError(r["tail"])
    out = json.loads(r["tail"].strip().splitlines()[-1])
    out["peak_rss"] = r["peak_rss"]
    return out


def run(size: str, precision: str, criteria: list[str], code: Path, exporter: str = "genai") -> dict:
    """One model (``CACHE/<size>/<exporter>_<precision>``): floor, the PyTorch baselines (fp32 only), then each
    criterion's prune run."""
    base = CACHE / size
    folder = base / f"{exporter}_{precision}"
    calib = CACHE / "calib.txt"
    weights = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))
    res = {"size": size, "precision": precision, "exporter": exporter, "params": None, "file_bytes": weights,
           "code": str(code)}
    res["floor"] = _json_child(FLOOR, [str(folder), str(calib)])
    if precision == "fp32":
        res["torch"] = _json_child(TORCH, [str(base / "hf"), str(folder), str(calib), str(SIZES[size][1] // 4)])
    for c in criteria:
        with tempfile.TemporaryDirectory() as d:
            cmd = [sys.executable, "-m", "onnx_consensus", "prune", str(folder), os.path.join(d, "out"), "--calib",
                   str(calib), *COMMON, "--remove", str(SIZES[size][1] // 4), *CRITERIA[c],
                   "--report", os.path.join(d, "r.json"), "-q"]
            r = _child(cmd, code)
            if r["rc"] == 0:
                rep = json.load(open(os.path.join(d, "r.json")))
                r["removed"] = [x["index"] for x in rep["removed"]]
                r["checks"] = rep.get("checks")  # the written folder's check run
                r["runs"] = [x["staged"] for x in rep.get("rounds", []) if "staged" in x]  # suffix / full runs
                # the criterion alone (the rounds' runs, graph work and metrics: no load, perplexities or write)
                r["criterion_s"] = round(sum(x["ort_seconds"] + x["metric_seconds"] for x in rep.get("rounds", [])), 2)
                res["params"] = rep["params"]["before"]
        r["wall_x_floor"] = round(r["wall_s"] / res["floor"]["floor_s"], 1)
        r["cpu_x_floor"] = round(r["cpu_s"] / res["floor"]["floor_cpu_s"], 1)
        r["rss_x_file"] = round(r["peak_rss"] / weights, 2)
        if "criterion_s" in r:
            r["criterion_x_floor"] = round(r["criterion_s"] / res["floor"]["floor_s"], 1)
        res[c] = r
        print(json.dumps({k: v for k, v in r.items() if k != "tail"}), file=sys.stderr, flush=True)
    return res


QUALITY = {"exact": ["--prescreen", "0"], "staged_1": ["--prescreen", "1"], "staged_2": ["--prescreen", "2"],
           "staged_3": ["--prescreen", "3"], "bi": ["--metrics", "cosine", "--scope", "local"]}


def quality(model: str = "llama", remove: int = 4, criteria=tuple(QUALITY), code: Path = ROOT) -> list[dict]:
    """The staged criterion's quality (``--prescreen K``) against the exact global criterion (``--prescreen 0``)
    and Block Influence: the trained tiny Llama of ``tools/data/build_llms.py`` (genai fp32 export, ``.cache/llm/``),
    ``--remove {remove}`` iterative on its calib.txt (all windows scored, ``--holdout 0``), then held-out
    perplexity (heldout.txt, 128-token windows) after the first 1, 2, 4 removals; CPU seconds of each prune run
    (a child process)."""
    sys.path.insert(0, str(code))
    from onnx_consensus.graph.decoder import find_decoder_layers
    from onnx_consensus.graph.ir import load_model_and_layout
    from onnx_consensus.graph.kv_surgery import remove_layers
    from onnx_consensus.llm.perplexity import perplexity
    from onnx_consensus.llm.text import load_text

    llm = ROOT / ".cache" / "llm"
    folder = llm / model / "genai"
    m, _ = load_model_and_layout(folder / "model.onnx")
    report = find_decoder_layers(m)
    held = load_text(llm / "text" / "heldout.txt", folder / "tokenizer.json", seq_len=128).windows
    rows = [{"criterion": "original", "ppl": perplexity(m, held, threads=2)}]
    for c in criteria:
        with tempfile.TemporaryDirectory() as d:
            r = _child([sys.executable, "-m", "onnx_consensus", "prune", str(folder), os.path.join(d, "out"),
                        "--calib", str(llm / "text" / "calib.txt"), "--unit", "layer", "--seq-len", "128",
                        "--holdout", "0", "--no-latency", "--threads", "2", "--remove", str(remove), *QUALITY[c],
                        "--report", os.path.join(d, "r.json"), "-q"], code)
            if r["rc"] != 0:
                raise RuntimeError(r["tail"])
            removed = [x["index"] for x in json.load(open(os.path.join(d, "r.json")))["removed"]]
        row = {"criterion": c, "removed": removed, "cpu_s": r["cpu_s"], "wall_s": r["wall_s"]}
        for k in sorted({1, 2, remove}):
            row[f"ppl_{k}"] = perplexity(remove_layers(m, removed[:k], report=report), held, threads=2)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def table(paths: list[str]) -> str:
    """The markdown table of result files (JSON lines of ``run``; a later line for the same model, criterion and
    code replaces an earlier one)."""
    rows: dict[tuple, tuple[dict, dict]] = {}
    for path in paths:
        for line in open(path):
            res = json.loads(line)
            for c in CRITERIA:
                if c in res:
                    code = res.get("label") or Path(res["code"]).name
                    prec = res["precision"] + (f" {res['exporter']}" if res.get("exporter", "genai") != "genai" else "")
                    rows[(res["size"], prec, c, code)] = (res, res[c])
    out = ["| model | params | file | code | criterion | floor: 1 ORT pass (wall / CPU s) | wall s (x floor) | "
           "CPU s (x floor) | criterion wall s (x floor) | peak RSS (x file) | PyTorch BI + angular (wall / CPU s) | "
           "removed |",
           "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for (size, prec, c, code), (res, r) in sorted(rows.items(), key=lambda kv: (list(SIZES).index(kv[0][0]),
                                                                                   kv[0][1], kv[0][3], kv[0][2])):
        hidden, layers = SIZES[size]
        fl, tq = res["floor"], res.get("torch")
        out.append(f"| {hidden}/{layers} {prec} | {res['params'] / 1e6:.0f}M | {res['file_bytes'] / 1e6:,.0f} MB | "
                   f"{code} | {c} | {fl['floor_s']:.2f} / {fl['floor_cpu_s']:.2f} | "
                   f"{r['wall_s']:.0f} ({r['wall_x_floor']}x) | {r['cpu_s']:.0f} ({r['cpu_x_floor']}x) | "
                   + (f"{r['criterion_s']:.0f} ({r['criterion_x_floor']}x) | " if "criterion_s" in r else "- | ")
                   + f"{r['peak_rss'] / 1e9:.2f} GB ({r['rss_x_file']}x) | "
                   + (f"{tq['torch_s']:.1f} / {tq['torch_cpu_s']:.1f} | " if tq else "- | ")
                   + f"{' '.join(map(str, r.get('removed', ['failed'])))} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("build", "run", "table", "quality", "optimum-env"))
    p.add_argument("files", nargs="*", help="table: the JSON-lines files of run --json")
    p.add_argument("--sizes", default="s,m,l")
    p.add_argument("--precisions", default="fp32,int4")
    p.add_argument("--criteria", default="default,paper,bi")
    p.add_argument("--exporter", choices=EXPORTERS, default="genai",
                   help="build/run: the genai builder's exports or optimum's (fp32 only)")
    p.add_argument("--optimum-python", default=str(OPTIMUM_PYTHON),
                   help="build --exporter optimum: an interpreter with optimum-onnx (default: optimum-env's)")
    p.add_argument("--code", default=str(ROOT), help="the checkout whose onnx_consensus the prune runs use")
    p.add_argument("--json", help="append the results to this JSON-lines file")
    p.add_argument("--label", help="run: the code's name in the table (default: the --code folder's name)")
    p.add_argument("--write", help="table: replace the table between the llm-scale-table markers of this file")
    a = p.parse_args(argv)
    if a.what == "table":
        text = table(a.files)
        if a.write:
            doc = Path(a.write).read_text()
            begin, end = "<!-- llm-scale-table:begin -->\n", "<!-- llm-scale-table:end -->"
            head, rest = doc.split(begin)
            Path(a.write).write_text(head + begin + text + "\n" + end + rest.split(end, 1)[1])
        print(text)
        return
    if a.what == "quality":
        res = {"quality": quality(), "load": os.getloadavg()}
        print(json.dumps(res))
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(res) + "\n")
        return
    if a.what == "optimum-env":
        print(optimum_env())
        return
    sizes, precisions = a.sizes.split(","), a.precisions.split(",")
    if a.exporter == "optimum":
        precisions = ["fp32"]
    for s in sizes:
        if a.what == "build":
            print(build_optimum(s, Path(a.optimum_python)) if a.exporter == "optimum" else build(s, precisions))
            continue
        for prec in precisions:
            res = run(s, prec, a.criteria.split(","), Path(a.code), a.exporter)
            res["label"] = a.label
            print(json.dumps(res))
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
