"""Hot-expert pinning, measured against the page cache (issue 19 item 4): the experts a routing trace
uses most, within a byte budget, locked in memory (mlock on the mapping llama.cpp made) so the
kernel never evicts them; the rest of the limit is left to the page cache.

An experiment of the memory-limited bench (`bench_memlimit.py --pin`), not a runtime option. It did
not beat the page cache, which keeps hot pages by itself (docs/memory.md has the result), so it is not
kept in the package: it was lexi_gguf.measure.memlimit.pin until issue 34 moved it here. The memory-
limited child (lexi_gguf.measure.memlimit.child) imports mlock_ranges from here only when a bench
passes it ranges to pin (the checkout's root is on the child's PYTHONPATH).
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from lexi_gguf import LexiError
from lexi_gguf.gguf.reader import EXPERT_TENSORS, open_one
from lexi_gguf.measure.memlimit.pagecache import PAGE, libc


def expert_ranges(path: str | Path) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """(block, expert) -> the (file offset, length) of its slice of each expert tensor of that block."""
    r = open_one(path)
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for t in r.tensors:
        parts = t.name.split(".")
        if len(parts) < 4 or parts[0] != "blk" or parts[2] not in EXPERT_TENSORS:
            continue
        n_expert = int(t.shape[-1])
        size = int(t.n_bytes) // n_expert
        for e in range(n_expert):
            out.setdefault((int(parts[1]), e), []).append((int(t.data_offset) + e * size, size))
    return out


def hot_experts(trace, ranges: dict, budget: int) -> list[tuple[int, int]]:
    """The experts the trace selected most often (all MoE layers ranked together), while their bytes fit
    `budget`."""
    counts = []
    for j, blk in enumerate(trace.moe_layers):
        sel = trace.experts[:, j, :]
        freq = np.bincount(sel[sel >= 0].astype(np.int64), minlength=trace.n_expert)
        counts += [(int(f), int(blk), e) for e, f in enumerate(freq) if f > 0]
    chosen, used = [], 0
    for _, blk, e in sorted(counts, key=lambda x: -x[0]):
        size = sum(n for _, n in ranges[(blk, e)])
        if used + size > budget:
            break
        chosen.append((blk, e))
        used += size
    return chosen


def mapping_of(path: str | Path) -> list[tuple[int, int, int]]:
    """(start address, end address, file offset) of this process's mappings of `path` (/proc/self/maps)."""
    want = os.path.realpath(path)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == want:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                out.append((lo, hi, int(fields[2], 16)))
    return out


def mlock_ranges(path: str | Path, ranges: list[tuple[int, int]]) -> int:
    """mlock each (file offset, length) of `path` where this process has it mapped; returns bytes locked.
    The pages are read now (mlock faults them in) and stay until the process exits."""
    maps = mapping_of(path)
    if not maps:
        raise LexiError(f"{Path(path).name} is not mapped in this process: pinning needs the model loaded with mmap")
    lc = libc()
    locked = 0
    for off, n in ranges:
        m = next(((lo, hi, mo) for lo, hi, mo in maps if mo <= off and off + n <= mo + (hi - lo)), None)
        if m is None:
            raise LexiError(f"bytes {off}-{off + n} of {Path(path).name} are not in one mapping of it")
        addr = m[0] + off - m[2]
        beg = addr & ~(PAGE - 1)
        if lc.mlock(ctypes.c_void_p(beg), ctypes.c_size_t(addr + n - beg)) != 0:
            err = ctypes.get_errno()
            raise LexiError(f"mlock of {n / 2**20:.1f} MiB failed: {os.strerror(err)} (after {locked / 2**20:.0f} MiB; "
                            "raise the locked-memory limit, `ulimit -l`, or pin less)")
        locked += n
    return locked
