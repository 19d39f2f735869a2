"""heap.unpool_large_blocks: after an arena-free session's options, a large C-heap block is its own mapping even
once a larger one was freed (glibc would have raised its threshold above it). Checked with glibc's own count of
mapped blocks (mallinfo2().hblks)."""
import ctypes
import ctypes.util
import pathlib
import subprocess
import sys

import pytest



class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("no mallinfo2 (glibc < 2.33)")
    libc.mallinfo2.restype = _Mallinfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def _mapped_after_large_free(libc, size: int) -> bool:
    """Whether a ``size``-byte block is mapped after a 16 MiB mapped block was freed."""
    big = libc.malloc(16 << 20)
    libc.free(big)  # glibc's dynamic threshold would now be 16 MiB
    before = libc.mallinfo2().hblks
    p = libc.malloc(size)
    try:
        return libc.mallinfo2().hblks == before + 1
    finally:
        libc.free(p)


def test_arena_free_sessions_unpool_large_blocks():
    """In a fresh process (a test worker's other threads and earlier tests move glibc's counts): after an
    arena-free session's options, a 2 MiB block is its own mapping even once a 16 MiB one was freed (glibc's
    raised threshold would keep it on the heap), a 256 KiB one is not."""
    _libc()
    code = (f"import sys; sys.path.insert(0, {str(pathlib.Path(__file__).resolve().parents[1])!r})\n"
            "from tests.test_heap import _libc, _mapped_after_large_free\n"
            "from onnx_consensus import heap\n"
            "from onnx_consensus.runtime import session_options\n"
            "libc = _libc()\n"
            "session_options('disable', arena=False)\n"
            "print(heap.unpool_large_blocks(), _mapped_after_large_free(libc, 2 * heap.LARGE_BLOCK),\n"
            "      _mapped_after_large_free(libc, heap.LARGE_BLOCK // 4))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "True", "False"]
