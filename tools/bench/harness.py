"""The one harness of the resumable benchmarks (tools/bench/criteria.py, between.py, rescore.py and the paper's
reproduction, tools/paper/): a config key, a result cache, shards of the unit list, locks, and bench rows.

- ``config_key(config)``: a short hash of everything a result depends on (a JSON-able dict, dataclass or list),
  so a changed configuration never reuses stale results: results live under ``cache_dir(bench, key)``, i.e.
  ``.cache/<bench>/<key>/``.
- ``write_json`` / ``read_json``: a unit's result, written atomically (a temporary beside it, then a rename), so
  an interrupted worker never leaves half a result and a rerun resumes where it stopped.
- ``shard(units, "k/n")``: every n-th unit from the k-th, for n workers on n cores (``--shard``, ``add_shard``).
- ``claim`` / ``release`` / ``run_claimed``: a unit being computed is locked (``<result>.lock``, holding the
  worker's pid; a lock whose process died is taken over), so unsharded workers share one list unit by unit.
- ``BenchRow``: the base of the benchmarks' result dataclasses (``to_json`` / ``from_json``; the JSON keys are
  the field names, so cached results keep loading).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]

T = TypeVar("T")
R = TypeVar("R", bound="BenchRow")


def config_key(config: Any, length: int = 10) -> str:
    """Hex SHA-1 prefix (``length`` characters) of ``config`` as sorted JSON; a dataclass counts as its fields."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:length]


def cache_dir(bench: str, key: str) -> Path:
    """``.cache/<bench>/<key>/`` of the repository (not created)."""
    return ROOT / ".cache" / bench / key


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` (a BenchRow, or JSON-able) to ``path`` atomically, creating its folder."""
    if isinstance(obj, BenchRow):
        obj = obj.to_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    """The JSON at ``path``, or None when there is none yet."""
    return json.loads(path.read_text()) if path.exists() else None


def shard(units: list[T], spec: str | None) -> list[T]:
    """``spec`` "k/n": every n-th unit starting at the k-th (None or "": all of them)."""
    if not spec:
        return list(units)
    k, n = (int(v) for v in spec.split("/"))
    return list(units)[k::n]


def add_shard(parser: argparse.ArgumentParser, what: str = "units") -> None:
    """The ``--shard k/n`` option every sharded benchmark takes."""
    parser.add_argument("--shard", default=None, help=f"k/n: this worker's share of the {what} (default: all)")


def claim(path: Path) -> bool:
    """Take the unit whose result goes to ``path`` for this process: False when it is done or another live
    process holds its lock (``path``.lock, holding the pid), so several unsharded workers share one list."""
    if path.exists():
        return False
    lock = path.with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            return False  # held by a live process
        except (ProcessLookupError, ValueError):
            lock.unlink(missing_ok=True)  # stale: its process died
            return claim(path)
        except FileNotFoundError:
            return claim(path)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return not path.exists()


def release(path: Path) -> None:
    path.with_suffix(".lock").unlink(missing_ok=True)


def run_claimed(jobs: Iterable[tuple[Path, Callable[[], Any]]]) -> Iterator[Any]:
    """Compute and write each (result path, compute) job this process can claim (``claim``), skipping the
    finished and the ones another live worker holds; yields the results computed here."""
    for path, compute in jobs:
        if not claim(path):
            continue
        try:
            result = compute()
            write_json(path, result)
        finally:
            release(path)
        yield result


@dataclasses.dataclass
class BenchRow:
    """Base of a benchmark's result row: a plain dataclass whose fields are the JSON keys of its cached file."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls: type[R], data: dict) -> R:
        """The row from its cached JSON (keys that are not fields, from older runs, are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def load(cls: type[R], path: Path) -> R | None:
        data = read_json(path)
        return None if data is None else cls.from_json(data)

    @classmethod
    def of(cls: type[R], value: R | dict) -> R:
        """``value`` as this row: a row is kept, a dict (a nested row read from JSON) converted."""
        return value if isinstance(value, cls) else cls.from_json(value)


@dataclasses.dataclass
class Cost(BenchRow):
    """What one unit cost: CPU seconds of its process, wall seconds, and the 1-minute load average at its start
    and end (on a shared machine wall time is an upper bound; CPU seconds are the comparable figure)."""

    cpu_seconds: float
    wall_seconds: float
    loadavg: tuple[float, float]


class Meter:
    """Context manager measuring a unit's ``Cost`` (``record()`` after the block)."""

    def __enter__(self) -> Meter:
        self.cpu, self.wall, self.load0 = time.process_time(), time.perf_counter(), os.getloadavg()[0]
        return self

    def __exit__(self, *exc) -> None:
        self.cpu = time.process_time() - self.cpu
        self.wall = time.perf_counter() - self.wall
        self.load = (round(self.load0, 2), round(os.getloadavg()[0], 2))

    def record(self) -> Cost:
        return Cost(round(self.cpu, 1), round(self.wall, 1), self.load)
