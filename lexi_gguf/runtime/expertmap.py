"""Where each routed expert's bytes are in llama.cpp's mapping of a GGUF, and the system calls the
expert cache (runtime.expertcache) makes on them: madvise (RANDOM, WILLNEED, PAGEOUT / DONTNEED),
posix_fadvise(DONTNEED) and mincore, through libc.

llama.cpp maps the whole file once (use_mmap; it may unmap the head and tail it does not use), so an
expert's slice of one of its tensors is at base + the tensor's file offset + expert x the tensor's
per-expert stride (n_bytes / n_expert), base being the address of file offset 0 in that mapping."""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import LexiError

PAGE = mmap.PAGESIZE
MADV_RANDOM, MADV_WILLNEED, MADV_DONTNEED, MADV_PAGEOUT = 1, 3, 4, 21
EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps")
USE_ORDER = {"ffn_up_exps": 0, "ffn_gate_up_exps": 0, "ffn_gate_exps": 1, "ffn_down_exps": 2}   # llama.cpp's build_moe_ffn
_libc = None


def libc():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        lib.syscall.restype = ctypes.c_long
        _libc = lib
    return _libc


@dataclass
class ExpertLayout:
    """moe_layers: the MoE blocks; n_expert; slices[j]: (file offset, stride) of each expert tensor of MoE
    layer j, in the order the layer's matmuls read them (up or gate_up, gate, down); expert_bytes[j]: one expert's bytes in layer j (all its
    slices); ranges: (file offset, bytes) of every expert tensor; other_bytes: everything else."""
    moe_layers: list[int]
    n_expert: int
    slices: list[list[tuple[int, int]]]
    expert_bytes: list[int]
    ranges: list[tuple[int, int]]
    other_bytes: int
    file_size: int

    def spans(self, j: int, e: int):
        """(file offset, bytes) of expert e of MoE layer j, one per tensor."""
        return [(off + e * stride, stride) for off, stride in self.slices[j]]


def layout(path: str | Path) -> ExpertLayout:
    from ..gguf.reader import model_info, open_reader
    r = open_reader(path)
    if len(getattr(r, "paths", [path])) > 1:
        raise LexiError(f"--expert-cache: {path} is a split set; the cache manages one mapped file (merge the shards "
                        "with llama-gguf-split --merge)")
    info = model_info(path, r)
    if not info.is_moe:
        raise LexiError(f"--expert-cache: {path} has no MoE layers; run it without --expert-cache")
    E = info.expert_count
    by_block: dict[int, list[tuple[int, int, int]]] = {}
    ranges, expert_total = [], 0
    for t in r.tensors:
        parts = t.name.split(".")
        if len(parts) > 2 and parts[0] == "blk" and parts[2] in EXPERT_TENSORS:
            n = int(t.n_bytes)
            by_block.setdefault(int(parts[1]), []).append((USE_ORDER[parts[2]], int(t.data_offset), n // E))
            ranges.append((int(t.data_offset), n))
            expert_total += n
    moe = [il for il in info.moe_layers if il in by_block]
    slices = [[(off, stride) for _, off, stride in sorted(by_block[il])] for il in moe]   # in the order the matmuls read them
    size = os.path.getsize(path)
    return ExpertLayout(moe, E, slices, [sum(s for _, s in sl) for sl in slices], ranges, size - expert_total, size)


def mapping_bases(path: str | Path) -> set[int]:
    """The address of file offset 0 of each of this process's mappings of `path` (/proc/self/maps: a
    mapping split by madvise or partly unmapped still gives one base)."""
    want, out = os.path.realpath(path), set()
    st = os.stat(want)
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 6 or parts[5].strip() != want:
                continue
            dev_ino = int(parts[4])
            if dev_ino != st.st_ino:
                continue
            lo = int(parts[0].split("-")[0], 16)
            out.add(lo - int(parts[2], 16))
    return out


def page_in(lo: int, n: int) -> tuple[int, int]:
    """[lo, lo + n) widened to whole pages: (start, length)."""
    a = lo - lo % PAGE
    return a, -(-(lo + n - a) // PAGE) * PAGE


def page_within(lo: int, n: int) -> tuple[int, int]:
    """The whole pages inside [lo, lo + n) (a page shared with a neighbour is left out)."""
    a = -(-lo // PAGE) * PAGE
    b = (lo + n) - (lo + n) % PAGE
    return a, max(0, b - a)


def madvise(addr: int, n: int, advice: int) -> int:
    """0, or the errno."""
    if n <= 0:
        return 0
    return 0 if libc().madvise(ctypes.c_void_p(addr), n, advice) == 0 else ctypes.get_errno()


_CACHESTAT = 451          # x86-64 / arm64 / generic syscall number (Linux 6.5+)
_cachestat_ok = True


def cachestat(fd: int, off: int, n: int) -> int | None:
    """Pages of [off, off + n) of the file in the page cache (cachestat(2): walks only the cached pages,
    far cheaper than mincore over a large, mostly absent range); None where the kernel lacks it."""
    global _cachestat_ok
    if not _cachestat_ok:
        return None
    rng = (ctypes.c_uint64 * 2)(off, n)
    st = (ctypes.c_uint64 * 5)()
    if libc().syscall(ctypes.c_long(_CACHESTAT), ctypes.c_int(fd), rng, st, ctypes.c_uint(0)) != 0:
        _cachestat_ok = False
        return None
    return int(st[0])


def resident_pages(addr: int, n: int) -> np.ndarray:
    """mincore over [addr, addr + n) (page aligned): one bool a page."""
    pages = -(-n // PAGE)
    vec = (ctypes.c_ubyte * max(1, pages))()
    if libc().mincore(ctypes.c_void_p(addr), n, vec) != 0:
        raise LexiError(f"mincore failed: {os.strerror(ctypes.get_errno())}")
    return (np.frombuffer(vec, np.uint8)[:pages] & 1).astype(bool)


def resident_in(base: int, spans) -> int:
    """Bytes resident (mincore) in the given (file offset, bytes) spans of the mapping at `base`: each
    page counted once, whole."""
    seen: set[int] = set()
    for off, n in spans:
        a, m = page_in(base + off, n)
        for i in np.flatnonzero(resident_pages(a, m)):
            seen.add(a + int(i) * PAGE)
    return len(seen) * PAGE


def resident_total(base: int, ranges) -> int:
    """Bytes resident over whole expert tensors (mincore), one call per tensor."""
    total = 0
    for off, n in ranges:
        a, m = page_in(base + off, n)
        total += int(resident_pages(a, m).sum()) * PAGE
    return total
