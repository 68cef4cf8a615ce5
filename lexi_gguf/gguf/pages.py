"""Pages of a GGUF that gguf-py maps read-only, given back once they are read: a tensor streamed from a
17 GB file would otherwise stay in the process's resident set (RSS counts a mapping's touched file pages)
until the whole file has been. MADV_DONTNEED on a read-only shared file mapping only unmaps: the page
cache keeps the data, a later read maps it again."""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap

import numpy as np

MADV_DONTNEED = 4
_madvise = None


def _libc_madvise():
    global _madvise
    if _madvise is None:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
        fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
        _madvise = fn
    return _madvise


def release(arr) -> bool:
    """Unmap the whole pages under `arr` if it is a view of a read-only np.memmap (never anything else:
    on anonymous or copy-on-write memory MADV_DONTNEED would discard data). True if it did."""
    if not isinstance(arr, np.memmap) or getattr(arr, "mode", None) != "r" or arr.nbytes == 0:
        return False
    lo, n, page = int(arr.ctypes.data), int(arr.nbytes), mmap.PAGESIZE
    a = -(-lo // page) * page                  # whole pages only: a page shared with a neighbour stays
    b = (lo + n) - (lo + n) % page
    return b > a and _libc_madvise()(ctypes.c_void_p(a), b - a, MADV_DONTNEED) == 0
