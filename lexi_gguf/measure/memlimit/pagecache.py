"""How much of a file is in the page cache (mincore) and dropping it (posix_fadvise), through libc."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path


PAGE = mmap.PAGESIZE
_libc = None


def libc():
    """libc through ctypes, with the signatures this package calls (loaded once)."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        lib.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = lib
    return _libc


def resident_bytes(path: str | Path) -> int | None:
    """Bytes of the file in the page cache now (mincore on a fresh mapping; touches no page).
    None where mincore is not available."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    try:
        lc = libc()
    except OSError:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = lc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            n = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * n)()
            if lc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return None
            import numpy as np
            pages = int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1))
            return min(size, pages * PAGE)
        finally:
            lc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def set_files(path: str | Path) -> list[Path]:
    """gguf.reader.set_files (every shard of a split GGUF), or [path] for a file that is not a GGUF."""
    from ...gguf.reader import set_files as gguf_files
    try:
        return gguf_files(path)
    except Exception:      # noqa: BLE001  (not a GGUF, or unreadable: the file itself)
        return [Path(path)]


def evict(path: str | Path) -> dict:
    """Drop the file's pages (every shard's, for a split GGUF) from the page cache (posix_fadvise
    DONTNEED; no root needed). Pages that a process has mapped (or that are dirty) stay. Returns resident
    bytes before and after."""
    files = set_files(path)
    before = sum(resident_bytes(f) or 0 for f in files)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):
                os.fdatasync(fd)      # dirty pages (a file just written) are not dropped: write them back first
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return {"resident_before": before, "resident_after": sum(resident_bytes(f) or 0 for f in files)}
