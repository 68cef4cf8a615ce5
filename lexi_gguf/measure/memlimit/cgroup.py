"""Memory cgroups (v2 memory.max, v1 memory.limit_in_bytes): made, limited and removed by the
bench; sizes read and written as people write them."""
from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from pathlib import Path

from ... import LexiError


CGROUP_ROOT = Path("/sys/fs/cgroup")
MIN_LIMIT = 64 * 2**20          # below this not even the interpreter and the runtime fit
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(s: str | int | float) -> int:
    """'3G', '3.5GiB', '512M', '1.5g', '4096' -> bytes. Bare K/M/G/T are binary (as cgroups and
    `ulimit`/`docker --memory` read them); KB/MB/GB decimal, KiB/MiB/GiB binary."""
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        if s <= 0:
            raise LexiError(f"memory size {s!r} must be positive")
        return int(s)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(s))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise LexiError(f"cannot read memory size {s!r}: write e.g. 3G, 3.5GiB, 512M or a number of bytes")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise LexiError(f"memory size {s!r} must be positive")
    return n


def fmt_size(n: float) -> str:
    for unit, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n:.0f} B"


def detect(root: str | Path | None = None) -> tuple[int, Path]:
    """(2, /sys/fs/cgroup) on a unified hierarchy with the memory controller, else (1, .../memory);
    LexiError when neither has a memory controller."""
    root = Path(root) if root is not None else CGROUP_ROOT
    ctl = root / "cgroup.controllers"
    if ctl.exists():
        try:
            if "memory" in ctl.read_text().split():
                return 2, root
        except OSError:
            pass
    v1 = root / "memory"
    if (v1 / "memory.limit_in_bytes").exists():
        return 1, v1
    raise LexiError(f"no cgroup memory controller under {root} (neither cgroup v2 with 'memory' in "
                    "cgroup.controllers nor a v1 memory hierarchy): --mem-limit cannot be enforced on this machine")


class MemGroup:
    """A memory cgroup made by memory_cgroup(): its path, version, and the files a bench reads."""

    def __init__(self, path: Path, version: int, root: Path, limit: int):
        self.path, self.version, self.root, self.limit = path, version, root, limit

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def add(self, pid: int | None = None) -> None:
        (self.procs).write_text(f"{pid or os.getpid()}\n")

    def peak(self) -> int | None:
        return read_peak(self.path, self.version)

    def stat(self) -> dict[str, int]:
        return read_stat(self.path)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "version": self.version, "limit": self.limit}


def read_peak(path: Path, version: int) -> int | None:
    f = path / ("memory.peak" if version == 2 else "memory.max_usage_in_bytes")
    try:
        return int(f.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_stat(path: Path) -> dict[str, int]:
    out = {}
    try:
        for line in (Path(path) / "memory.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            if v.strip().lstrip("-").isdigit():
                out[k] = int(v)
    except OSError:
        pass
    return out


def write_value(path: Path, value) -> None:
    path.write_text(f"{value}\n")


def check_limit(limit: int) -> None:
    if limit < MIN_LIMIT:
        raise LexiError(f"memory limit {fmt_size(limit)} is below the minimum of {fmt_size(MIN_LIMIT)}: the Python "
                        "interpreter and the llama.cpp runtime alone need about that much")


@contextlib.contextmanager
def memory_cgroup(limit: int | str, *, root: str | Path | None = None, name: str | None = None):
    """A fresh memory cgroup limited to `limit` bytes (no swap where the controller can say so).
    Yields a MemGroup; on exit the processes still in it go back to the hierarchy's root and the group
    is removed, whatever happened in the body."""
    limit = parse_size(limit)
    check_limit(limit)
    version, base = detect(root)
    if os.geteuid() != 0:
        raise LexiError(f"--mem-limit needs root: creating a memory cgroup under {base} is not allowed for "
                        f"uid {os.geteuid()}; run the bench as root (e.g. with sudo)")
    path = base / (name or f"lexi-gguf-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        path.mkdir()
    except OSError as e:
        raise LexiError(f"cannot create the memory cgroup {path}: {e.strerror or e}") from None
    group = MemGroup(path, version, base, limit)
    try:
        if version == 2:
            write_value(path / "memory.max", limit)
            if (path / "memory.swap.max").exists():
                write_value(path / "memory.swap.max", 0)
        else:
            write_value(path / "memory.limit_in_bytes", limit)
            if (path / "memory.memsw.limit_in_bytes").exists():
                write_value(path / "memory.memsw.limit_in_bytes", limit)   # memory + swap = memory: no swap
            if (path / "memory.swappiness").exists():
                with contextlib.suppress(OSError):
                    write_value(path / "memory.swappiness", 0)
        yield group
    finally:
        remove_group(group)


def remove_group(group: MemGroup, tries: int = 50) -> None:
    """Move what is left in the group to the root and rmdir it (retries while exiting tasks linger)."""
    for _ in range(tries):
        try:
            pids = [p for p in group.procs.read_text().split() if p]
        except OSError:
            pids = []
        for p in pids:
            with contextlib.suppress(OSError):
                write_value(group.root / "cgroup.procs", p)
        try:
            group.path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    raise LexiError(f"could not remove the cgroup {group.path}; remove it with `rmdir {group.path}`")
