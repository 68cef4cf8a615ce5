"""Where CPU weights live: repacked or read in place from the mmapped GGUF (docs/memory.md).

On x86 and ARM, ggml's CPU backend repacks the weights of some quant types (Q4_0, Q4_K, IQ4_NL, ...)
into interleaved layouts for faster matmuls. The repacked copy is anonymous memory: those bytes are no
longer pages of the file, so a model larger than RAM at such a quant cannot page its experts from disk
(it is OOM-killed or swaps) and expert prefetch (madvise on the mapping) has nothing to act on.
`repack off` is llama.cpp's `--no-repack` (model param use_extra_bufts = false): every weight is used
in place from the mapping, at the plain kernels' speed.

`auto` (the default) turns repacking off when paging is what matters: with --prefetch on, or when
the file is larger than the memory this process may use (MemAvailable, and its cgroup's limit), and
says so once at load; otherwise it leaves llama.cpp's default (repack on).
"""
from __future__ import annotations

import sys
from pathlib import Path

from .. import LexiError
from .options import REPACK_MODES

_said: set[tuple[str, str]] = set()     # (file, reason) already said: once per process


def check(mode: str) -> None:
    if mode not in REPACK_MODES:
        raise LexiError(f"unknown repack mode {mode!r}: use {', '.join(REPACK_MODES)}")


def cgroup_room(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process's memory cgroup may still grow by (v2 memory.max - memory.current, or v1
    limit_in_bytes - usage_in_bytes); None without a limit."""
    try:
        entries = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for entry in entries:
        _, ctrl, rel = entry.split(":", 2)
        if ctrl == "":      # v2
            d = root / rel.lstrip("/")
            limit_f, usage_f = d / "memory.max", d / "memory.current"
        elif "memory" in ctrl.split(","):
            d = root / "memory" / rel.lstrip("/")
            limit_f, usage_f = d / "memory.limit_in_bytes", d / "memory.usage_in_bytes"
        else:
            continue
        try:
            limit = limit_f.read_text().strip()
            if limit == "max" or int(limit) >= 1 << 60:
                return None
            return max(0, int(limit) - int(usage_f.read_text().strip()))
        except (OSError, ValueError):
            return None
    return None


def available_bytes() -> int | None:
    """Memory this process can fill now: MemAvailable, capped by its cgroup's room; None if unknown."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    room = cgroup_room()
    known = [x for x in (avail, room) if x is not None]
    return min(known) if known else None


def model_bytes(path: Path) -> int:
    """Bytes of a GGUF, every shard of a split set included (by llama.cpp's shard names: no file is
    parsed, this runs on every load; runtime.llama.check_file has checked the set)."""
    from ..gguf.split import shard_name, split_prefix
    split = split_prefix(path)
    if split is None:
        return Path(path).stat().st_size
    prefix, _, count = split
    return sum(p.stat().st_size for p in (shard_name(prefix, i, count) for i in range(count)) if p.exists())


def decide(path: Path, mode: str | None, prefetch: str, cache: bool = False) -> bool:
    """Whether llama.cpp may repack (mode: a load's LoadOptions.repack; None is auto; off with --prefetch
    or an expert cache); an auto decision to turn it off is said once (stderr)."""
    mode = mode or "auto"
    check(mode)
    if mode != "auto":
        return mode == "on"
    if prefetch != "off" or cache:
        why = ("--prefetch reads experts from the mapped file" if prefetch != "off" else
               "--expert-cache manages experts in the mapped file")
    else:
        avail, size = available_bytes(), model_bytes(path)
        if avail is None or size <= avail:
            return True
        why = (f"the model ({size / 2**30:.2f} GiB) is larger than the memory available "
               f"({avail / 2**30:.2f} GiB), so its weights must page from the file")
    key = (str(path), why.split(" (")[0])
    if key not in _said:
        _said.add(key)
        print(f"lexi-gguf: weights are not repacked ({why}); --repack on to keep ggml's faster CPU layouts "
              "(docs/memory.md)", file=sys.stderr, flush=True)
    return False
