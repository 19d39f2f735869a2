"""The memory and nesting limits of a run, in one place.

``memory_budget()`` is the most memory one tensor or one decoded file of an untrusted model or data file may
take: ``MEMORY_FRACTION`` of physical RAM, whatever the run's budget. ``default_budget()`` is a prune run's
budget when ``--max-memory`` is not given: ``BUDGET_SHARE`` of the memory available when it starts
(``memory.fit_memory`` picks the batch that fits it). ``format_size`` writes sizes for messages.
``MAX_SUBGRAPH_DEPTH`` bounds how deeply control-flow subgraphs may nest (the graph walkers recurse once per
level). Checks against them live where the data is read: ``graph.sanity`` for models, ``data.formats`` and
``data.images`` for calibration files.
"""
from __future__ import annotations

import os

#: Share of physical RAM one tensor (declared, or computed by ConstantOfShape/Expand/Tile) or one decoded
#: data file may take.
MEMORY_FRACTION = 0.5
#: Deepest nesting of If/Loop/Scan bodies accepted (real exports nest 1-3 levels; protobuf itself parses
#: about 33, its message depth limit of 100 over graph -> node -> attribute).
MAX_SUBGRAPH_DEPTH = 16
_FALLBACK_RAM = 8 * 2**30  # where the platform does not say how much RAM there is
BUDGET_SHARE = 0.6
"""The default ``--max-memory``: this share of the memory available when the run starts (MemAvailable)."""


def physical_memory() -> int:
    """Bytes of physical RAM (``_FALLBACK_RAM`` where the platform does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return _FALLBACK_RAM


def memory_budget() -> int:
    """Bytes one tensor or decoded file may take: ``MEMORY_FRACTION`` of physical RAM."""
    return int(physical_memory() * MEMORY_FRACTION)


def available_memory() -> int | None:
    """Bytes the system can give without swapping: MemAvailable of /proc/meminfo, else free pages
    (``os.sysconf``); None when neither is readable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget() -> int | None:
    """A run's memory budget without ``--max-memory``: ``BUDGET_SHARE`` of ``available_memory`` (None when
    unknown: no budget)."""
    avail = available_memory()
    return None if avail is None else int(avail * BUDGET_SHARE)


def format_size(n: float) -> str:
    """Bytes for messages: '5.1 GB' from 1 GB, '310 MB' from 1 MB, '12 KB' from 1 KB, else '512 B'."""
    for unit, size, fmt in (("GB", 2**30, ".1f"), ("MB", 2**20, ".0f"), ("KB", 2**10, ".0f")):
        if abs(n) >= size:
            return f"{n / size:{fmt}} {unit}"
    return f"{n:.0f} B"
