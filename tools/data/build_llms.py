"""Small decoder LLMs for issue 14, built here from small configs, and their ONNX exports with a KV cache.

Text: the Vim user manual (``/usr/share/vim/vim90/doc/usr_*.txt``, Debian package ``vim-runtime``, Vim
licence: free, open source), 36 chapters, about 640 KB of English prose with commands in it. Sorted chapters,
every 6th one is held out (``heldout.txt``, perplexity); the rest is the training text (``train.txt``), and
``calib.txt`` is a 32 KB slice of it for pruning calibration.

Tokenizer: byte-level BPE, 2048 ids, trained with ``tokenizers`` on train.txt; ``<|endoftext|>`` is id 0
(bos = eos = pad). Saved as ``tokenizer.json`` (+ ``tokenizer_config.json``) beside every model.

Models (``transformers``):
* ``llama``: LlamaForCausalLM (RMSNorm, rotary, GQA 4 query / 2 KV heads, SwiGLU), 6 layers, hidden 128,
  trained here for ``--minutes`` (default 10) on 2 threads, batches of 16 sequences of 128 tokens (what the
  training reached: docs/BENCHMARKS.md, "Decoder LLMs");
* ``qwen2``: Qwen2ForCausalLM (q/k/v biases), 4 layers, hidden 128, random weights (seed 0).

Exports of each model (and of each reference with layers deleted in PyTorch, ``REFERENCES``):
* ``optimum/model.onnx``: optimum-onnx, task ``text-generation-with-past`` (inputs input_ids, attention_mask,
  position_ids, past_key_values.N.key/value; outputs logits, present.N.key/value; decomposed attention);
* ``genai/model.onnx``: the onnxruntime-genai model builder, fp32, cpu (GroupQueryAttention,
  SkipSimplifiedLayerNormalization; genai_config.json beside it); ``genai_int4/``: the same with ``-p int4``
  (MatMulNBits). The builder of onnxruntime-genai 0.18 needs transformers 5.x, optimum-onnx 0.1.0 needs
  transformers < 4.58: the two exports come from two environments (extras ``llm`` and ``llm-optimum``).

``--tiny DIR`` builds only a random-weight 4-layer Llama, its single-layer deletions and their genai exports
(fp32, int4), in-process, in seconds: the default tests' fixture (tests/test_genai_builder.py).

Layout under ``.cache/llm/``: ``text/``, ``tokenizer/``, ``<model>/hf``, ``<model>/optimum``, ``<model>/genai``,
``<model>/genai_int4``, ``<model>_drop<i>-<j>/{hf,optimum,genai,genai_int4}``. Every step writes to a temporary
folder renamed when complete, and is skipped when its folder exists (an exporter that is not installed is
skipped with a log line), so the script is idempotent and rerunnable, once per environment::

    python -m tools.data.build_llms            # everything
    python -m tools.data.build_llms --only qwen2
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "llm"
TEXT_GLOB = "/usr/share/vim/vim90/doc/usr_*.txt"
VOCAB = 2048
SEQ = 128
EOT = "<|endoftext|>"
log = logging.getLogger("build_llms")

CONFIGS = {
    "llama": dict(arch="LlamaForCausalLM", model_type="llama", hidden_size=128, intermediate_size=352,
                  num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                  rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False),
    "qwen2": dict(arch="Qwen2ForCausalLM", model_type="qwen2", hidden_size=128, intermediate_size=256,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                  rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False,
                  use_sliding_window=False),
}
# References for the surgery-equivalence tests: the model with these layers deleted in PyTorch.
REFERENCES = {"llama": [(1, 3)], "qwen2": [(2,)]}


def _atomic_dir(final: Path):
    """A context manager yielding a temporary folder beside ``final``, renamed to it on success."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    return cm()


# ---------------------------------------------------------------- text and tokenizer

def build_text(out: Path = CACHE / "text") -> Path:
    """train.txt, calib.txt (32 KB of train), heldout.txt (every 6th chapter) from the Vim user manual."""
    if out.exists():
        return out
    import glob

    files = sorted(glob.glob(TEXT_GLOB))
    if not files:
        raise SystemExit(f"no text at {TEXT_GLOB}: install the Debian package vim-runtime")
    train, held = [], []
    for i, f in enumerate(files):
        (held if i % 6 == 5 else train).append(Path(f).read_text(encoding="utf-8", errors="replace"))
    with _atomic_dir(out) as tmp:
        t = "\n".join(train)
        (tmp / "train.txt").write_text(t, encoding="utf-8")
        (tmp / "heldout.txt").write_text("\n".join(held), encoding="utf-8")
        mid = len(t) // 2
        (tmp / "calib.txt").write_text(t[mid:mid + 32768], encoding="utf-8")
        held_names = ", ".join(Path(f).name for i, f in enumerate(files) if i % 6 == 5)
        (tmp / "SOURCE").write_text("Vim 9.0 user manual (vim-runtime), " + ", ".join(Path(f).name for f in files)
                                    + f"\nheld out: {held_names}\n")
    return out


def build_tokenizer(out: Path = CACHE / "tokenizer") -> Path:
    """A byte-level BPE with VOCAB ids trained on train.txt, saved with save_pretrained (tokenizer.json)."""
    if out.exists():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = build_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(text / "train.txt")], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                   unk_token=EOT)
    with _atomic_dir(out) as tmp:
        fast.save_pretrained(tmp)
    return out


def encode_file(path: Path, tokenizer_dir: Path):
    """All token ids of a text file (int64 1-D numpy array)."""
    import numpy as np
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return np.asarray(tok.encode(path.read_text(encoding="utf-8")).ids, dtype=np.int64)


# ---------------------------------------------------------------- models

def _config(name: str):
    from transformers import AutoConfig

    c = dict(CONFIGS[name])
    arch = c.pop("arch")
    mt = c.pop("model_type")
    cfg = AutoConfig.for_model(mt, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0, **c)
    cfg.architectures = [arch]
    return cfg


def build_model(name: str, minutes: float = 10.0, threads: int = 2) -> Path:
    """``<name>/hf``: the model saved with save_pretrained (safetensors, fp32) plus the tokenizer files."""
    out = CACHE / name / "hf"
    if out.exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok_dir = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(name), torch_dtype=torch.float32)
    info: dict = {"name": name, "params": sum(p.numel() for p in model.parameters())}
    if name == "llama":
        info.update(_train(model, tok_dir, minutes, threads))
    model.eval()
    with _atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        PreTrainedTokenizerFast.from_pretrained(tok_dir).save_pretrained(tmp)
        (tmp / "build_info.json").write_text(json.dumps(info, indent=1))
    return out


def _train(model, tok_dir: Path, minutes: float, threads: int) -> dict:
    """Next-token training on train.txt for ``minutes`` of wall time; held-out perplexity at the end."""
    import math

    import numpy as np
    import torch

    torch.set_num_threads(threads)
    text = build_text()
    ids = encode_file(text / "train.txt", tok_dir)
    held = encode_file(text / "heldout.txt", tok_dir)
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    batch = 16
    model.train()
    t0 = time.time()
    step, losses = 0, []
    budget = minutes * 60
    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        for g in opt.param_groups:  # linear warm-up over 30 steps, then cosine decay over the time budget
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        starts = rng.integers(0, len(ids) - SEQ - 1, batch)
        x = torch.from_numpy(np.stack([ids[s:s + SEQ] for s in starts]))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            log.info("step %d loss %.3f (%.0f s)", step, np.mean(losses[-50:]), time.time() - t0)
    model.eval()
    ppl = heldout_perplexity(model, held)
    log.info("trained %d steps in %.0f s; held-out perplexity %.2f", step, time.time() - t0, ppl)
    return {"text": TEXT_GLOB, "steps": step, "batch": batch, "seq": SEQ, "seconds": round(time.time() - t0),
            "threads": threads, "final_train_loss": float(np.mean(losses[-50:])), "heldout_ppl": ppl}


def heldout_perplexity(model, ids, seq: int = SEQ) -> float:
    """exp(mean next-token loss) over non-overlapping windows of ``seq`` tokens (PyTorch model)."""
    import math

    import torch

    n = (len(ids) - 1) // seq
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, 32):
            x = torch.from_numpy(ids[i * seq:min(n, i + 32) * seq].reshape(-1, seq))
            tot += model(input_ids=x, labels=x).loss.item() * x.shape[0]
            cnt += x.shape[0]
    return math.exp(tot / cnt)


def delete_layers(name: str, layers: tuple[int, ...]) -> Path:
    """``<name>_drop<i>-<j>/hf``: the model with decoder layers ``layers`` deleted in PyTorch."""
    tag = f"{name}_drop" + "-".join(map(str, layers))
    out = CACHE / tag / "hf"
    if out.exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    src = build_model(name)
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    keep = [i for i in range(model.config.num_hidden_layers) if i not in layers]
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in keep)
    for new, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    with _atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        PreTrainedTokenizerFast.from_pretrained(src).save_pretrained(tmp)
        (tmp / "build_info.json").write_text(json.dumps({"from": name, "deleted_layers": list(layers)}))
    return out


# ---------------------------------------------------------------- exports

def export_optimum(hf: Path) -> Path:
    """``optimum/model.onnx`` (text-generation-with-past, fp32, opset default), in a subprocess."""
    out = hf.parent / "optimum"
    if out.exists():
        return out
    with _atomic_dir(out) as tmp:
        _run([sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", str(hf),
              "--task", "text-generation-with-past", "--no-post-process", str(tmp)])
        if not (tmp / "model.onnx").exists():
            raise RuntimeError(f"optimum wrote no model.onnx in {tmp}")
    return out


def export_genai(hf: Path, precision: str = "fp32") -> Path:
    """``genai/model.onnx`` (fp32) or ``genai_int4/model.onnx`` (int4: MatMulNBits) + genai_config.json: the
    onnxruntime-genai builder, cpu."""
    out = hf.parent / ("genai" if precision == "fp32" else f"genai_{precision}")
    if out.exists():
        return out
    with _atomic_dir(out) as tmp:
        work = hf.parent / "genai_work"
        _run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(tmp),
              "-p", precision, "-e", "cpu", "-c", str(work)])
        shutil.rmtree(work, ignore_errors=True)
        if not (tmp / "genai_config.json").exists():
            raise RuntimeError(f"the genai builder wrote no genai_config.json in {tmp}")
    return out


# ---------------------------------------------------------------- tiny exports for the default tests

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.3, tie_word_embeddings=False)
TINY_VOCAB = 256
TINY_PRECISIONS = ("fp32", "int4")


def _tiny_tokenizer(out: Path) -> None:
    """A word-level tokenizer of TINY_VOCAB ids (``<s>`` = 0, then ``w0``..``w254``), saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, **{f"w{i}": i + 1 for i in range(TINY_VOCAB - 1)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>", pad_token="<s>",
                            unk_token="<s>").save_pretrained(out)


def build_tiny(out: Path, precisions=TINY_PRECISIONS) -> Path:
    """Random-weight (seed 0, ``initializer_range`` 0.3 so that greedy tokens vary) LlamaForCausalLM of the TINY
    config (4 layers, hidden 64, GQA 4/2 heads, head size 16, vocab 256) and its exports by the onnxruntime-genai
    builder, in-process (seconds): ``out/llama/{hf,genai_<precision>}`` and, for each layer i, the model with
    layer i deleted in PyTorch before export, ``out/llama_drop<i>/{hf,genai_<precision>}``; the same with tied
    embeddings, int4 only (the builder then quantizes the embeddings too: ``GatherBlockQuantized``), as
    ``out/llama_tied[_drop<i>]/{hf,genai_int4}``. ``out/build_info.json`` records the versions and the PyTorch
    parameter count of the untied model. Idempotent: done when build_info.json exists."""
    if (out / "build_info.json").exists():
        return out
    import contextlib
    import io

    import onnxruntime_genai
    import torch
    import transformers
    from onnxruntime_genai.models.builder import create_model, parse_extra_options
    from transformers import LlamaConfig, LlamaForCausalLM

    variants = {}
    for name, tied in (("llama", False), ("llama_tied", True)):  # tied: int4 embeddings as GatherBlockQuantized
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=TINY_VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                          **{**TINY, "tie_word_embeddings": tied})
        model = LlamaForCausalLM(cfg).eval()
        variants[name] = (model, ("int4",) if tied else precisions)
        for i in range(cfg.num_hidden_layers):
            variants[f"{name}_drop{i}"] = (_without_layers(model, (i,)), variants[name][1])
    model = variants["llama"][0]
    for name, (m, kinds) in variants.items():
        hf = out / name / "hf"
        m.save_pretrained(hf, safe_serialization=True)
        _tiny_tokenizer(hf)
        for precision in kinds:
            dst = out / name / f"genai_{precision}"
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                extra = parse_extra_options(None, str(hf), str(dst), precision, "cpu", str(out / "work"), None)
                create_model(None, str(hf), str(dst), precision, "cpu", str(out / "work"), **extra)
    shutil.rmtree(out / "work", ignore_errors=True)
    info = {"onnxruntime_genai": onnxruntime_genai.__version__, "transformers": transformers.__version__,
            "torch_params": sum(p.numel() for p in model.parameters()), "config": TINY, "vocab": TINY_VOCAB}
    (out / "build_info.json").write_text(json.dumps(info, indent=1))
    return out


def _without_layers(model, layers: tuple[int, ...]):
    """A deep copy of a *ForCausalLM with decoder ``layers`` deleted (caches renumbered, config updated)."""
    import copy

    import torch

    m = copy.deepcopy(model)
    keep = [i for i in range(m.config.num_hidden_layers) if i not in layers]
    m.model.layers = torch.nn.ModuleList(m.model.layers[i] for i in keep)
    for new, layer in enumerate(m.model.layers):
        layer.self_attn.layer_idx = new
    m.config.num_hidden_layers = len(keep)
    if getattr(m.config, "layer_types", None):
        m.config.layer_types = [m.config.layer_types[i] for i in keep]
    return m


def _run(cmd: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log.info("$ %s", " ".join(cmd))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{cmd[2]} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def _installed(what: str, module: str) -> bool:
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        log.info("%s not installed: its exports are skipped in this environment", what)
    return found


def build_all(names: list[str], minutes: float, threads: int) -> list[Path]:
    done = []
    for name in names:
        hf = build_model(name, minutes, threads)
        refs = [delete_layers(name, layers) for layers in REFERENCES[name]]
        for h in [hf, *refs]:
            t = time.time()
            if _installed("optimum", "optimum.exporters.onnx"):
                done.append(export_optimum(h))
            if _installed("onnxruntime-genai", "onnxruntime_genai"):
                done.extend(export_genai(h, p) for p in ("fp32", "int4"))
            log.info("exports of %s ready (%.0f s)", h.parent.name, time.time() - t)
    return done


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=sorted(CONFIGS), action="append")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall time of the llama model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", metavar="DIR", help="only the tiny random-weight Llama and its genai builder exports "
                                                  "(fp32, int4; every single-layer deletion) into DIR (seconds)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.tiny:
        print(build_tiny(Path(a.tiny)))
        return
    for path in build_all(a.only or sorted(CONFIGS), a.minutes, a.threads):
        print(path)


if __name__ == "__main__":
    main()
