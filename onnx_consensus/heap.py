"""Large C-heap blocks handed back to the system when freed (issue 25: the 1.0B optimum export's peak).

Sessions without a memory arena (``runtime.session_options(arena=False)``) allocate each intermediate tensor
with ``malloc`` and free it after its last reader, so that a run's activations go back to the system. glibc
defeats that: its mmap threshold (the size from which a block gets its own mapping, unmapped on ``free``)
starts at 128 KiB and rises to the size of any mapped block freed, up to 32 MiB; from then on activations of a
few MiB come from the heap, whose freed space is kept and, fragmented by the tensors a run keeps (its
outputs), grows with every layer. A decomposed-attention export (many tensors of 1 to 25 MiB a batch) so kept
~1.7 GB of freed activations during one forward pass at 1.0B parameters. ``unpool_large_blocks`` fixes the
threshold (which also stops its rise): blocks of at least ``LARGE_BLOCK`` bytes are mapped and unmapped, as
glibc does for them before its first adjustment. Values computed do not change; only where the bytes live.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = ["LARGE_BLOCK", "unpool_large_blocks"]

LARGE_BLOCK = 1 << 20
"""Bytes from which a C-heap block is its own mapping (glibc's ``M_MMAP_THRESHOLD``, fixed)."""

M_MMAP_THRESHOLD = -3  # glibc's malloc.h


@functools.cache
def unpool_large_blocks() -> bool:
    """Fix glibc's mmap threshold at ``LARGE_BLOCK`` for this process (module docstring), once. Returns whether
    the allocator took it (False: not Linux, not glibc, or refused)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK)) if hasattr(libc, "mallopt") else False
