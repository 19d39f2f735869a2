"""The limits untrusted models and data are held to, in one place.

``memory_budget()`` is the most memory one tensor or one decoded file may take: ``MEMORY_FRACTION`` of physical
RAM (a ``--max-memory`` option, when there is one, is the value to return here instead).
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


def physical_memory() -> int:
    """Bytes of physical RAM (``_FALLBACK_RAM`` where the platform does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return _FALLBACK_RAM


def memory_budget() -> int:
    """Bytes one tensor or decoded file may take: ``MEMORY_FRACTION`` of physical RAM."""
    return int(physical_memory() * MEMORY_FRACTION)


def fmt_bytes(n: float) -> str:
    """``1.5 GB``-style size for messages."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
