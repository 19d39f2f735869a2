"""Calibration and held-out text for decoder LLMs: files -> token ids -> fixed-length windows.

A text source is a ``.txt`` file, a ``.jsonl`` file (one JSON object per line; its ``"text"`` field, or the
line itself when it is a JSON string), or a folder of such files (sorted by name, not recursive). Documents
(files, JSONL records) are tokenised one by one with the ``tokenizers`` library from the ``tokenizer.json``
that sits beside the model (or one given), joined, and cut into non-overlapping windows of ``seq_len``
tokens; the tail shorter than a window is dropped.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..paths import confined_file

TEXT_SUFFIXES = (".txt", ".jsonl")
INPUT = "input_ids"  # the name a window is fed under


@dataclass
class TextData:
    """Token windows of a text, as ``data.batches.Batches``: a sample is a window, fed as ``{"input_ids": (B,
    seq_len) int64}`` (the decoder's other inputs, its mask, positions and empty caches, are the model's:
    ``graph.decoder.dummy_feed`` / ``llm.perplexity``); no labels, no fixed batch.

    windows: (n, seq_len) int64 token ids; source: the text path; tokenizer: the tokenizer.json used;
    n_tokens: tokens in the text before cutting into windows."""

    windows: np.ndarray
    source: str
    tokenizer: str
    n_tokens: int
    labels = None
    fixed_batch = None

    @property
    def n_samples(self) -> int:
        return int(self.windows.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.windows.shape[1])

    @property
    def batch_axes(self) -> dict[str, int | None]:
        return {INPUT: 0}

    def batches(self, batch_size: int, indices: Sequence[int] | None = None) -> Iterator[dict[str, np.ndarray]]:
        """``{"input_ids": (B, seq_len) int64}`` of the windows ``indices`` (default all), B <= batch_size."""
        for feeds, _ in self.counted_batches(batch_size, indices):
            yield feeds

    def counted_batches(self, batch_size: int,
                        indices: Sequence[int] | None = None) -> Iterator[tuple[dict[str, np.ndarray], int]]:
        """``batches`` with each batch's number of windows (all real: text is never padded)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
        order = np.arange(self.n_samples) if indices is None else np.asarray(indices, dtype=np.int64)
        for s in range(0, len(order), int(batch_size)):
            rows = self.windows[order[s:s + int(batch_size)]]
            yield {INPUT: rows}, len(rows)

    def split(self, holdout_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(score window indices, hold-out window indices), each sorted int64: a seeded random
        ``holdout_fraction`` of the windows held back (at least one window each side when there are two or more;
        none held back for one window)."""
        n = self.n_samples
        k = int(round(n * holdout_fraction))
        if n >= 2:
            k = min(max(k, 1 if holdout_fraction > 0 else 0), n - 1)
        else:
            k = 0
        order = np.random.default_rng(seed).permutation(n)
        return np.sort(order[k:]).astype(np.int64), np.sort(order[:k]).astype(np.int64)

    def split_windows(self, holdout: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(score windows, hold-out windows): the windows of ``split``."""
        keep, hold = self.split(holdout, seed)
        return self.windows[keep], self.windows[hold]

    def labels_for(self, indices) -> None:
        """Text has no labels."""
        return None


def find_tokenizer(model_path: str | os.PathLike, given: str | os.PathLike | None = None, *,
                   follow_symlinks: bool = False) -> str:
    """The tokenizer.json to use: ``given`` (a file, or a folder holding tokenizer.json), else the one beside
    the model (in the model's folder, or in the folder given as the model), which must be a regular file inside
    that folder (a symbolic link out of it only with ``follow_symlinks``; UnsafePathError). InputError when
    there is none."""
    if given is not None:
        p = os.fspath(given)
        p = os.path.join(p, "tokenizer.json") if os.path.isdir(p) else p
        if not os.path.isfile(p):
            raise InputError(f"tokenizer not found: {p}")
        return p
    folder = os.fspath(model_path)
    folder = folder if os.path.isdir(folder) else os.path.dirname(os.path.abspath(folder))
    p = os.path.join(folder, "tokenizer.json")
    if not os.path.lexists(p):
        raise InputError(f"no tokenizer.json beside the model (in {folder}): give one with --tokenizer")
    return confined_file(folder, "tokenizer.json", what="the tokenizer beside the model",
                         follow_symlinks=follow_symlinks, hint="pass --follow-symlinks or --tokenizer FILE")


def _documents(path: str, follow_symlinks: bool = False) -> list[str]:
    """The documents of a text source (see the module docstring); a folder's files must be regular files inside
    it (symbolic links out of it only with ``follow_symlinks``)."""
    if os.path.isdir(path):
        files = [confined_file(path, f, what=f"text file {os.path.join(path, f)}", follow_symlinks=follow_symlinks,
                               hint="pass --follow-symlinks to read it")
                 for f in sorted(os.listdir(path)) if f.endswith(TEXT_SUFFIXES) and not f.startswith(".")
                 and not os.path.isdir(os.path.join(path, f))]
        if not files:
            raise InputError(f"no .txt or .jsonl files in {path}")
    elif os.path.isfile(path):
        if not path.endswith(TEXT_SUFFIXES):
            raise InputError(f"calibration text must be .txt or .jsonl (or a folder of them): {path}")
        files = [path]
    else:
        raise InputError(f"calibration text not found: {path}")
    docs = []
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                content = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read {f} as UTF-8 text: {exc}") from None
        if f.endswith(".jsonl"):
            for k, line in enumerate(content.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{f}:{k}: not JSON ({exc.msg})") from None
                text = rec if isinstance(rec, str) else rec.get("text") if isinstance(rec, dict) else None
                if not isinstance(text, str):
                    raise InputError(f"{f}:{k}: expected a JSON string or an object with a \"text\" string")
                docs.append(text)
        else:
            docs.append(content)
    return docs


def load_text(path: str | os.PathLike, tokenizer: str | os.PathLike, *, seq_len: int = 128,
              max_samples: int | None = None, follow_symlinks: bool = False) -> TextData:
    """Token windows (n, seq_len) of the text at ``path`` tokenised with ``tokenizer`` (a tokenizer.json).
    max_samples: keep the first that many windows. follow_symlinks: read files of a text folder that link out
    of it. InputError when the text gives no full window."""
    if seq_len < 2:
        raise InputError("--seq-len must be >= 2")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise InputError("decoder LLMs need the tokenizers package: pip install 'onnx-consensus[llm]'") from None
    try:
        tok = Tokenizer.from_file(os.fspath(tokenizer))
    except Exception as exc:  # noqa: BLE001 - the library raises its own exception types
        raise InputError(f"cannot load tokenizer {tokenizer}: {exc}") from None
    path = os.fspath(path)
    ids: list[int] = []
    for doc in _documents(path, follow_symlinks):
        ids.extend(tok.encode(doc).ids)
    n = len(ids) // seq_len
    if max_samples is not None:
        n = min(n, max_samples)
    if n < 1:
        raise InputError(f"{path}: {len(ids)} tokens, fewer than one window of --seq-len {seq_len}")
    windows = np.asarray(ids[:n * seq_len], dtype=np.int64).reshape(n, seq_len)
    return TextData(windows, os.path.abspath(path), os.path.abspath(os.fspath(tokenizer)), len(ids))
