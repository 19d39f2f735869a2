"""Held-out perplexity and tokens/s of the decoder exports of tools/data/build_llms.py, whole and with layers removed.

Perplexity: the held-out text (tokenised with the tokenizer.json beside the model) cut into non-overlapping
windows of ``--seq`` tokens, each run as a prefill with a zero-length cache in onnxruntime; exp of the mean
next-token cross-entropy (natural log). Throughput: prefill of ``--seq`` tokens (batch 1) and greedy decode
steps with the cache, in onnxruntime, and generation in onnxruntime-genai (genai exports), 1 thread.

    python -m tools.bench.llm_eval                       # llama: whole, every single layer removed, both exports
    python -m tools.bench.llm_eval --model qwen2 --drop 1 2
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from tools.data.build_llms import CACHE, build_text  # noqa: E402


def session(path: str | os.PathLike, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feed(sess, tokens: np.ndarray, past: dict, plen: int) -> dict:
    batch = tokens.shape[0]
    f = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            f[i.name] = tokens
        elif i.name == "attention_mask":
            f[i.name] = np.ones((batch, plen + tokens.shape[1]), np.int64)
        elif i.name == "position_ids":
            f[i.name] = np.tile(np.arange(plen, plen + tokens.shape[1]), (batch, 1))
        elif i.name in past:
            f[i.name] = past[i.name]
        else:  # an empty cache: (batch, kv_heads, 0, head_dim)
            f[i.name] = np.zeros([batch if k == 0 else 0 if k == 2 else d for k, d in enumerate(i.shape)],
                                 np.float32)
    return f


def perplexity(sess, ids: np.ndarray, seq: int = 128, batch: int = 8) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``seq`` tokens of ``ids`` (prefill only)."""
    n = len(ids) // seq
    windows = ids[:n * seq].reshape(n, seq)
    nll, count = 0.0, 0
    for s in range(0, n, batch):
        x = windows[s:s + batch]
        logits = sess.run(["logits"], _feed(sess, x, {}, 0))[0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        tgt = x[:, 1:]
        nll -= np.take_along_axis(logp[:, :-1], tgt[..., None], -1).sum()
        count += tgt.size
    return math.exp(nll / count)


def throughput(sess, prompt_len: int = 128, steps: int = 32, repeats: int = 3) -> dict:
    """Tokens/s of a prefill of ``prompt_len`` tokens and of ``steps`` greedy decode steps (batch 1, best of
    ``repeats``)."""
    rng = np.random.default_rng(0)
    names = [o.name for o in sess.get_outputs()]
    best_p, best_d = math.inf, math.inf
    for _ in range(repeats):
        x = rng.integers(0, 2048, (1, prompt_len))
        t = time.perf_counter()
        out = dict(zip(names, sess.run(None, _feed(sess, x, {}, 0))))
        best_p = min(best_p, time.perf_counter() - t)
        plen = prompt_len
        t = time.perf_counter()
        for _ in range(steps):
            past = {n.replace("present", "past_key_values"): v for n, v in out.items() if n.startswith("present")}
            tok = out["logits"][:, -1:].argmax(-1)
            out = dict(zip(names, sess.run(None, _feed(sess, tok, past, plen))))
            plen += 1
        best_d = min(best_d, time.perf_counter() - t)
    return {"prefill_tok_s": prompt_len / best_p, "decode_tok_s": steps / best_d}


def genai_throughput(folder: str | os.PathLike, prompt_len: int = 128, steps: int = 32, repeats: int = 3) -> dict:
    """Tokens/s of onnxruntime-genai generation: prompt then ``steps`` greedy tokens (best of ``repeats``)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    rng = np.random.default_rng(0)
    best_p, best_d = math.inf, math.inf
    for _ in range(repeats):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt_len + steps, do_sample=False)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(rng.integers(0, 2048, (1, prompt_len)).astype(np.int32))
        best_p = min(best_p, time.perf_counter() - t)
        t = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        best_d = min(best_d, time.perf_counter() - t)
    return {"prefill_tok_s": prompt_len / best_p, "decode_tok_s": steps / best_d}


def main(argv: list[str] | None = None) -> None:
    from onnx_consensus.llm.folder import prune_folder
    from tools.data.build_llms import encode_file

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama")
    p.add_argument("--drop", type=int, nargs="*", help="layers to remove (default: each single layer in turn)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    a = p.parse_args(argv)
    base = CACHE / a.model
    ids = encode_file(build_text() / "heldout.txt", base / "hf")
    n_layers = json.loads((base / "hf" / "config.json").read_text())["num_hidden_layers"]
    variants = [()] + ([tuple(a.drop)] if a.drop else [(i,) for i in range(n_layers)])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for drop in variants:
            row = {"removed": list(drop)}
            for kind in ("optimum", "genai"):
                folder = base / kind
                if drop:
                    folder = Path(tmp) / f"{kind}_{'-'.join(map(str, drop))}"
                    prune_folder(base / kind, folder, drop)
                sess = session(folder / "model.onnx")
                row[f"{kind}_ppl"] = perplexity(sess, ids, a.seq)
                row[f"{kind}_ort"] = throughput(sess)
                if kind == "genai":
                    row["genai_og"] = genai_throughput(folder)
            rows.append(row)
            print(json.dumps(row))
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
