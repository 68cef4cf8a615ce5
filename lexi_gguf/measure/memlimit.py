"""`lexi-gguf bench --mem-limit SIZE`: decode speed of a model larger than the memory it may use.

Each configuration (full k, each stored LExI budget, uniform k at the same total) runs in a fresh
child process inside a memory cgroup (v2: memory.max; v1: memory.limit_in_bytes) created and removed
by the bench. The child joins the group before it loads anything, evicts the model file from the page
cache (posix_fadvise DONTNEED, no root needed), loads it mmapped (llama.cpp's MAP_POPULATE reads the
file through the group, so what stays cached is what the limit allows), runs a fixed warm-up, then
decodes n_gen tokens and reports decode tok/s, major page faults per token, bytes read from storage per
token (/proc/self/io read_bytes) and the group's peak memory. Page-cache pages are charged to the group
that faulted them in, which is why the file is evicted first: pages cached by someone else would be
free hits that the limit never sees.

Creating a cgroup needs root; without it the error says so in one line.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import mmap
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from .. import LexiError

CGROUP_ROOT = Path("/sys/fs/cgroup")
MIN_LIMIT = 64 * 2**20          # below this not even the interpreter and the runtime fit
PAGE = mmap.PAGESIZE
RESULT_TAG = "LEXI_MEMLIMIT_RESULT "

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


# --- cgroups ---------------------------------------------------------------------------------------------

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


def _write(path: Path, value) -> None:
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
            _write(path / "memory.max", limit)
            if (path / "memory.swap.max").exists():
                _write(path / "memory.swap.max", 0)
        else:
            _write(path / "memory.limit_in_bytes", limit)
            if (path / "memory.memsw.limit_in_bytes").exists():
                _write(path / "memory.memsw.limit_in_bytes", limit)   # memory + swap = memory: no swap
            if (path / "memory.swappiness").exists():
                with contextlib.suppress(OSError):
                    _write(path / "memory.swappiness", 0)
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
                _write(group.root / "cgroup.procs", p)
        try:
            group.path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    raise LexiError(f"could not remove the cgroup {group.path}; remove it with `rmdir {group.path}`")


# --- page cache ------------------------------------------------------------------------------------------

_libc = None


def _c():
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        _libc = libc
    return _libc


def resident_bytes(path: str | Path) -> int | None:
    """Bytes of the file in the page cache now (mincore on a fresh mapping; touches no page).
    None where mincore is not available."""
    size = os.path.getsize(path)
    if size == 0:
        return 0
    try:
        libc = _c()
    except OSError:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            n = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * n)()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return None
            import numpy as np
            pages = int(np.count_nonzero(np.frombuffer(vec, dtype=np.uint8) & 1))
            return min(size, pages * PAGE)
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def evict(path: str | Path) -> dict:
    """Drop the file's pages from the page cache (posix_fadvise DONTNEED; no root needed). Pages that
    a process has mapped (or that are dirty) stay. Returns resident bytes before and after."""
    before = resident_bytes(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fdatasync(fd)      # dirty pages (a file just written) are not dropped: write them back first
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return {"resident_before": before, "resident_after": resident_bytes(path)}


# --- process counters ------------------------------------------------------------------------------------

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


def _delta(a: dict, b: dict, key: str):
    return None if a.get(key) is None or b.get(key) is None else b[key] - a[key]


# --- the disk ---------------------------------------------------------------------------------------------

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


# --- the child ---------------------------------------------------------------------------------------------

def _child(spec: dict) -> dict:
    """Runs in the child: join the group, evict, load mmapped, warm up, decode, count."""
    group = Path(spec["cgroup"]) if spec.get("cgroup") else None
    if group is not None:
        _write(group / "cgroup.procs", os.getpid())     # before anything big is loaded or mapped
    import numpy as np

    from ..runtime.llama import load
    path = spec["model"]
    ev = evict(path)
    c0 = counters(group)
    llm = load(path, kv_overrides=spec["kv"] or None, n_ctx=spec["warmup"] + spec["n_gen"] + 16, n_batch=32,
               n_threads=spec["threads"], n_gpu_layers=0, use_mmap=True, use_mlock=False,
               prefetch=spec.get("prefetch", "off"))
    c1 = counters(group)
    rng = np.random.default_rng(spec.get("seed", 0))
    toks = rng.integers(100, llm.n_vocab(), spec["warmup"] + spec["n_gen"]).tolist()
    llm.reset()
    for t in toks[:spec["warmup"]]:
        llm.eval([t])
    resident_warm = resident_bytes(path)
    if group is not None and spec.get("version") == 1:
        with contextlib.suppress(OSError):
            _write(group / "memory.max_usage_in_bytes", 0)   # v1: the peak from here on
    c2 = counters(group)
    per_tok = []
    for t in toks[spec["warmup"]:]:
        t0 = time.perf_counter()
        llm.eval([t])
        per_tok.append(time.perf_counter() - t0)
    c3 = counters(group)
    out = {"load_s": c1["t"] - c0["t"], "load_read_bytes": _delta(c0, c1, "read_bytes"),
           "load_majflt": _delta(c0, c1, "majflt"), "warmup_s": c2["t"] - c1["t"],
           "warmup_majflt": _delta(c1, c2, "majflt"), "warmup_read_bytes": _delta(c1, c2, "read_bytes"),
           "decode_s": c3["t"] - c2["t"], "majflt": _delta(c2, c3, "majflt"), "minflt": _delta(c2, c3, "minflt"),
           "read_bytes": _delta(c2, c3, "read_bytes"), "cg_pgmajfault": _delta(c2, c3, "cg_pgmajfault"),
           "cg_pgpgin_bytes": (_delta(c2, c3, "cg_pgpgin") or 0) * PAGE if c2.get("cg_pgpgin") is not None else None,
           "token_ms": [x * 1e3 for x in per_tok], "evicted": ev, "resident_after_warmup": resident_warm,
           "resident_after_decode": resident_bytes(path), "rss_anon_bytes": (proc_status_kib("RssAnon") or 0) * 1024,
           "rss_file_bytes": (proc_status_kib("RssFile") or 0) * 1024}
    if group is not None:
        out["decode_peak_bytes"] = read_peak(group, spec.get("version", 1)) if spec.get("version") == 1 else None
        st = read_stat(group)
        out["cg_usage_end"] = {k: st.get(k) for k in ("cache", "rss", "mapped_file", "file", "anon", "file_mapped")
                               if k in st}
    llm.close()
    return out


def run_child(spec: dict, *, timeout: float | None = None) -> dict:
    """One configuration in a fresh interpreter; its result is the tagged JSON line it prints."""
    from ..runtime.procs import ChildFailed
    cmd = [sys.executable, "-m", "lexi_gguf.measure.memlimit", json.dumps(spec)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    out = (r.stdout or "") + (r.stderr or "")
    if r.returncode != 0:
        if r.returncode in (-9, 137) and spec.get("cgroup"):
            raise ChildFailed(f"the decode under a {fmt_size(spec['limit'])} limit (out of memory: the limit is "
                              "below what the process needs besides the model's cache)", r.returncode, out)
        raise ChildFailed("the memory-limited decode", r.returncode, out)
    for line in reversed(r.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise LexiError(f"the memory-limited decode printed no result:\n{out[-2000:]}")


def _main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    try:
        res = _child(spec)
    except LexiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(RESULT_TAG + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


# --- the bench ------------------------------------------------------------------------------------------

def bench_mem_limited(path, budgets, *, mem_limit, n_gen: int = 16, warmup: int = 4, threads: int | None = None,
                      reps: int = 1, seed: int = 0, rates: bool = True, cgroup_root: str | Path | None = None,
                      timeout: float | None = None, progress: bool = True, prefetch: tuple[str, ...] = ("off",),
                      only: list[str] | None = None) -> dict:
    """Decode tok/s, major faults and storage bytes per token of each configuration (full, then uniform
    and lexi at each stored budget: lexi_gguf.measure.configs.run_configs) under a memory limit; each
    configuration and repetition in a fresh child inside a fresh memory cgroup. Same shape as
    lexi_gguf.measure.bench.bench (rows + machine) plus the limit, the model size, the disk and its rates.
    prefetch: expert prefetch modes to run each configuration with (runtime.set_prefetch); only: the
    configuration labels to run (e.g. ["full", "lexi 0.75"]), default all."""
    from .bench import backend_name
    from .configs import run_configs
    from ..runtime.cpu import machine
    from ..export.inspect import active, footprint

    limit = parse_size(mem_limit)
    check_limit(limit)
    version, base = detect(cgroup_root)
    if os.geteuid() != 0:   # say it before any work is done
        raise LexiError(f"--mem-limit needs root: creating a memory cgroup under {base} is not allowed for "
                        f"uid {os.geteuid()}; run the bench as root (e.g. with sudo)")
    path = Path(path)
    model_bytes = path.stat().st_size
    fp = footprint(path)
    from ..runtime.llama import PREFETCH_MODES
    bad = [m for m in prefetch if m not in PREFETCH_MODES]
    if bad:
        raise LexiError(f"unknown prefetch mode {bad[0]!r}: use {', '.join(PREFETCH_MODES)}")
    configs = run_configs(path, budgets)
    full_bytes = active(fp, configs[0].counts)[0]
    if only:
        labels = [c.label for c in configs]
        missing = [x for x in only if x not in labels]
        if missing:
            raise LexiError(f"no configuration {missing[0]!r} for this model: have {', '.join(labels)}")
        configs = [c for c in configs if c.label in only]
    threads = threads or os.cpu_count()
    disk = disk_rates(path) if rates else {"disk": disk_of(path)}
    if progress:
        print(f"  model {fmt_size(model_bytes)}, limit {fmt_size(limit)} (cgroup v{version}), disk "
              f"{disk['disk'].get('name')}" + (f": seq {disk['seq_read_bytes_per_s'] / 1e6:.0f} MB/s, random 4K "
              f"{disk['random_4k_reads_per_s']:.0f}/s, mmap faults {disk['mmap_random_faults_per_s']:.0f}/s"
              if rates else ""), flush=True)
    rows = []
    for c, pf in ((c, pf) for c in configs for pf in prefetch):
        runs = []
        for rep in range(reps):
            with memory_cgroup(limit, root=cgroup_root) as g:
                spec = {"model": str(path), "kv": c.kv, "n_gen": n_gen, "warmup": warmup, "threads": threads,
                        "seed": seed, "cgroup": str(g.path), "version": g.version, "limit": limit, "prefetch": pf}
                r = run_child(spec, timeout=timeout)
                r["peak_bytes"] = g.peak()
                r["cgroup_path"] = str(g.path)
            runs.append(r)
        tps = [n_gen / r["decode_s"] for r in runs]
        med = runs[sorted(range(reps), key=lambda i: tps[i])[reps // 2]]
        b = active(fp, c.counts)[0]
        row = {"config": c.config, "budget": c.budget, "avg_k": c.avg_k, "expert_used_count": c.counts, "prefetch": pf,
               "active_bytes": b, "ideal_speedup": full_bytes / b,
               "tg_tps": statistics.median(tps), "tg_min": min(tps), "tg_max": max(tps),
               "majflt_per_token": med["majflt"] / n_gen,
               "read_bytes_per_token": med["read_bytes"] / n_gen if med["read_bytes"] is not None else None,
               "peak_bytes": med["peak_bytes"], "reps": runs}
        rows.append(row)
        if progress:
            rb = row["read_bytes_per_token"]
            print(f"  {c.label:<14} prefetch {pf:<6} k={c.counts}  {row['tg_tps']:.2f} tok/s  {row['majflt_per_token']:.1f} majflt/tok  "
                  f"{(rb or 0) / 1e6:.1f} MB read/tok  peak {fmt_size(row['peak_bytes'] or 0)}", flush=True)
    full = rows[0]   # the first configuration (full k) with the first prefetch mode: the reference
    for r in rows:
        r["tg_speedup"] = r["tg_tps"] / full["tg_tps"]
    return {"model": str(path), "backend": backend_name(0), "threads": threads, "n_gpu_layers": 0,
            "n_gen": n_gen, "warmup": warmup, "reps": reps, "mem_limit_bytes": limit, "model_bytes": model_bytes,
            "cgroup_version": version, "use_mmap": True, "disk": disk.get("disk"),
            "disk_rates": {k: v for k, v in disk.items() if k != "disk"}, "machine": machine(), "rows": rows}


def table(res: dict) -> str:
    tg = f"tg{res['n_gen']}"
    head = (f"model {fmt_size(res['model_bytes'])}, memory limit {fmt_size(res['mem_limit_bytes'])} "
            f"(cgroup v{res['cgroup_version']}, mmap), {res['threads']} threads, warm-up {res['warmup']} tokens")
    lines = [head, "",
             f"| config | budget | prefetch | avg k | {tg} t/s | speed-up | ideal (active bytes) | major faults / token | "
             "MB read / token | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        rb = r.get("read_bytes_per_token")
        lines.append(f"| {r['config']} | {r['budget']:g} | {r.get('prefetch', 'off')} | {r['avg_k']:.2f} | {r['tg_tps']:.2f} "
                     f"({r['tg_min']:.2f}-{r['tg_max']:.2f}) | {r['tg_speedup']:.2f}x | {r['ideal_speedup']:.2f}x | "
                     f"{r['majflt_per_token']:.1f} | {'-' if rb is None else f'{rb / 1e6:.1f}'} | "
                     f"{'-' if r.get('peak_bytes') is None else round(r['peak_bytes'] / 2**20)} |")
    d = res.get("disk_rates") or {}
    if d.get("seq_read_bytes_per_s"):
        lines += ["", f"disk {(res.get('disk') or {}).get('name')}: sequential {d['seq_read_bytes_per_s'] / 1e6:.0f} MB/s, "
                  f"random 4 KiB {d['random_4k_reads_per_s']:.0f} reads/s, mmap faults "
                  f"{d['mmap_random_faults_per_s']:.0f}/s x {(d.get('mmap_bytes_per_fault') or 0) / 2**10:.0f} KiB each"]
        for r in res["rows"]:
            rb = r.get("read_bytes_per_token")
            if rb:
                r["seq_bound_tps"] = d["seq_read_bytes_per_s"] / rb
        lines.append("upper bound from sequential rate (tok/s): " +
                     ", ".join(f"{r['config']} {r['budget']:g}: {r['seq_bound_tps']:.2f}" for r in res["rows"]
                               if r.get("seq_bound_tps")))
    return "\n".join(lines)


def plot(res: dict, out) -> Path:
    from .plots import _plt
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, name, scale in ((axes[0], "tg_tps", "decode tok/s", 1), (axes[1], "majflt_per_token",
                                                                            "major faults / token", 1),
                                 (axes[2], "read_bytes_per_token", "MB read / token", 1e-6)):
        modes = sorted({r.get("prefetch", "off") for r in res["rows"]}, key=["off", "chosen", "guess"].index)
        for cfg, style in (("full", "s:"), ("uniform", "o--"), ("lexi", "^-")):
            for pf, color in zip(modes, ("k", "C1", "C2")):
                rs = sorted((r for r in res["rows"] if r["config"] == cfg and r.get("prefetch", "off") == pf
                             and r.get(key) is not None), key=lambda r: r["avg_k"])
                if rs:
                    ax.plot([r["avg_k"] for r in rs], [r[key] * scale for r in rs], style, color=color,
                            label=cfg if pf == "off" else f"{cfg} + prefetch {pf}")
        ax.set_xlabel("average active experts per MoE layer")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{Path(res['model']).name}: {fmt_size(res['model_bytes'])} under a {fmt_size(res['mem_limit_bytes'])} "
                 f"limit ({res['machine']['cpu']}, {res['threads']} threads)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
