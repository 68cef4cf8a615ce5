"""Where each routed expert's bytes are in llama.cpp's mapping of a GGUF, and the system calls the
expert cache (runtime.expertcache) makes on them: madvise (RANDOM, WILLNEED, PAGEOUT / DONTNEED),
posix_fadvise(DONTNEED) and mincore, through libc.

llama.cpp maps the whole file once (use_mmap; it may unmap the head and tail it does not use), so an
expert's slice of one of its tensors is at base + the tensor's file offset + expert x the tensor's
per-expert stride (n_bytes / n_expert), base being the address of file offset 0 in that mapping. A split
GGUF is mapped shard by shard: offsets here are the set's (each shard's file offsets shifted by the sizes
of the shards before it), and the cache turns one into an address with that shard's base."""
from __future__ import annotations

import bisect
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
    file_size: int                  # all shards
    files: list[str]                # the set's files, first shard first (one unless split)
    starts: list[int]               # each file's offset 0 in the set's offsets

    def file_of(self, off: int) -> int:
        """The index of the file holding set offset `off`."""
        return bisect.bisect_right(self.starts, off) - 1

    def spans(self, j: int, e: int):
        """(file offset, bytes) of expert e of MoE layer j, one per tensor."""
        return [(off + e * stride, stride) for off, stride in self.slices[j]]


def layout(path: str | Path) -> ExpertLayout:
    from ..gguf.reader import model_info, open_reader
    r = open_reader(path)
    shards = getattr(r, "shards", None) or [(Path(path), r)]
    starts, size = [], 0
    for p, _ in shards:
        starts.append(size)
        size += os.path.getsize(p)
    info = model_info(path, r)
    if not info.is_moe:
        raise LexiError(f"--expert-cache: {path} has no MoE layers; run it without --expert-cache")
    E = info.expert_count
    by_block: dict[int, list[tuple[int, int, int]]] = {}
    ranges, expert_total = [], 0
    for (_, rs), start in zip(shards, starts):
        for t in rs.tensors:
            parts = t.name.split(".")
            if len(parts) > 2 and parts[0] == "blk" and parts[2] in EXPERT_TENSORS:
                n, off = int(t.n_bytes), start + int(t.data_offset)
                by_block.setdefault(int(parts[1]), []).append((USE_ORDER[parts[2]], off, n // E))
                ranges.append((off, n))
                expert_total += n
    moe = [il for il in info.moe_layers if il in by_block]
    slices = [[(off, stride) for _, off, stride in sorted(by_block[il])] for il in moe]   # in the order the matmuls read them
    return ExpertLayout(moe, E, slices, [sum(s for _, s in sl) for sl in slices], ranges, size - expert_total, size,
                        [str(p) for p, _ in shards], starts)


class MappedSet:
    """The set's files as llama.cpp mapped them in this process: the address of a set offset, the file
    (and its descriptor) of an address. bases: the address of file offset 0 of each file's mapping (an
    int for one file); None: found in /proc/self/maps (each file mapped once)."""

    def __init__(self, lay: ExpertLayout, bases: int | list[int] | None = None):
        if bases is None:
            bases = []
            for f in lay.files:
                found = mapping_bases(f)
                if len(found) != 1:
                    raise LexiError(f"--expert-cache: {f} is {'not mmapped' if not found else 'mapped more than once'} "
                                    "in this process; load it with mmap (the default) and once")
                bases.append(found.pop())
        self.lay, self.bases = lay, [bases] if isinstance(bases, int) else list(bases)
        self.ends = [b + e - s for b, s, e in zip(self.bases, lay.starts, lay.starts[1:] + [lay.file_size])]
        self.fds = [os.open(f, os.O_RDONLY) for f in lay.files]

    def addr(self, off: int) -> int:
        s = self.lay.file_of(off)
        return self.bases[s] + off - self.lay.starts[s]

    def fadvise_dontneed(self, a: int, m: int) -> None:
        """Drop the page-cache pages of [a, a + m) (within one file) that no process maps."""
        s = next(i for i, (b, e) in enumerate(zip(self.bases, self.ends)) if b <= a < e)
        os.posix_fadvise(self.fds[s], a - self.bases[s], m, os.POSIX_FADV_DONTNEED)

    def cachestat(self, off: int, n: int) -> int | None:
        s = self.lay.file_of(off)
        return cachestat(self.fds[s], off - self.lay.starts[s], n)

    def read_and_drop(self, off: int, n: int) -> int:
        """pread n bytes at set offset off, then drop them from the page cache: the bytes read."""
        s = self.lay.file_of(off)
        fo = off - self.lay.starts[s]
        got = len(os.pread(self.fds[s], n, fo))
        os.posix_fadvise(self.fds[s], fo, n, os.POSIX_FADV_DONTNEED)
        return got

    def still_mapped(self) -> bool:
        return all(b in mapping_bases(f) for b, f in zip(self.bases, self.lay.files))

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []



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
