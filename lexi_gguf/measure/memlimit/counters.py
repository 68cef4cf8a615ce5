"""What a process read and faulted: /proc/self/io, /proc/self/status, getrusage and the group's
memory.stat, as one snapshot and the difference of two."""
from __future__ import annotations

import time
from pathlib import Path

from .cgroup import read_stat


def proc_io() -> dict[str, int]:
    """/proc/self/io of the whole process (all threads): read_bytes = bytes fetched from storage."""
    out = {}
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            k, _, v = line.partition(":")
            out[k.strip()] = int(v)
    except (OSError, ValueError):
        pass
    return out


def proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def counters(group_path: Path | None = None) -> dict:
    import resource
    ru = resource.getrusage(resource.RUSAGE_SELF)
    io = proc_io()
    st = read_stat(group_path) if group_path else {}
    return {"t": time.perf_counter(), "majflt": ru.ru_majflt, "minflt": ru.ru_minflt,
            "read_bytes": io.get("read_bytes"), "rchar": io.get("rchar"),
            "cg_pgmajfault": st.get("pgmajfault"), "cg_pgpgin": st.get("pgpgin")}


def delta(a: dict, b: dict, key: str):
    return None if a.get(key) is None or b.get(key) is None else b[key] - a[key]
