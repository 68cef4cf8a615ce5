"""The disk under a file: its block device, read-ahead, and its sequential, random-4K and
mmap-fault read rates."""
from __future__ import annotations

import contextlib
import mmap
import os
import time
from pathlib import Path

from .counters import proc_io
from .pagecache import PAGE, evict


def disk_of(path: str | Path) -> dict:
    """The block device a file lives on: name, rotational, read-ahead (from /sys/dev/block)."""
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    d = {"dev": f"{major}:{minor}", "name": None, "rotational": None, "read_ahead_kb": None}
    sysdev = Path(f"/sys/dev/block/{major}:{minor}")
    if not sysdev.exists():
        return d     # overlay/tmpfs/btrfs subvolume: no single block device
    real = sysdev.resolve()
    d["name"] = real.name
    queue = real / "queue"
    if not queue.exists() and (real.parent / "queue").exists():   # a partition: the disk's queue
        queue = real.parent / "queue"
    for key, f in (("rotational", "rotational"), ("read_ahead_kb", "read_ahead_kb")):
        with contextlib.suppress(OSError, ValueError):
            d[key] = int((queue / f).read_text())
    with contextlib.suppress(OSError):
        d["model"] = (real / "device" / "model").read_text().strip() or None
    return d


def disk_rates(path: str | Path, *, seconds: float = 3.0, max_seq: int = 1 << 30, max_random: int = 400,
               seed: int = 0) -> dict:
    """What bounds a memory-limited decode: the file's own sequential read rate, random 4 KiB read rate
    (readahead off) and mmap major-fault rate with the kernel's read-around (what llama.cpp's mapping
    gets), each measured right after evicting the file."""
    import random
    size = os.path.getsize(path)
    rng = random.Random(seed)
    out: dict = {"file_bytes": size, "disk": disk_of(path)}

    evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        n, t0 = 0, time.perf_counter()
        while n < min(size, max_seq) and time.perf_counter() - t0 < seconds:
            b = os.read(fd, 8 << 20)
            if not b:
                break
            n += len(b)
        out["seq_read_bytes_per_s"] = n / (time.perf_counter() - t0)
    finally:
        os.close(fd)

    evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        pages = max(1, size // 4096)
        n, t0 = 0, time.perf_counter()
        while n < max_random and time.perf_counter() - t0 < seconds:
            os.pread(fd, 4096, rng.randrange(pages) * 4096)
            n += 1
        dt = time.perf_counter() - t0
        out["random_4k_reads_per_s"] = n / dt
    finally:
        os.close(fd)

    evict(path)
    import resource
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pages = max(1, size // PAGE)
        io0, f0 = proc_io().get("read_bytes"), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        n, t0 = 0, time.perf_counter()
        while n < max_random and time.perf_counter() - t0 < seconds:
            mm[rng.randrange(pages) * PAGE]
            n += 1
        dt = time.perf_counter() - t0
        io1, f1 = proc_io().get("read_bytes"), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    faults = f1 - f0
    out["mmap_random_faults_per_s"] = faults / dt if dt > 0 else None
    out["mmap_bytes_per_fault"] = (io1 - io0) / faults if faults and io0 is not None else None
    out["mmap_read_bytes_per_s"] = (io1 - io0) / dt if io0 is not None and dt > 0 else None
    evict(path)
    return out
