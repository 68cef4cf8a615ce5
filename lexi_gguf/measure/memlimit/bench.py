"""`lexi-gguf bench --mem-limit`: every configuration decoded in its own memory-limited child; the
table and the plot."""
from __future__ import annotations

import os
import statistics
from pathlib import Path

from ... import LexiError
from .cgroup import check_limit, detect, fmt_size, memory_cgroup, parse_size
from .child import run_child
from .disk import disk_of, disk_rates


def bench_mem_limited(path, budgets, *, mem_limit, n_gen: int = 16, warmup: int = 4, threads: int | None = None,
                      reps: int = 1, seed: int = 0, rates: bool = True, cgroup_root: str | Path | None = None,
                      timeout: float | None = None, progress: bool = True, prefetch: tuple[str, ...] = ("off",),
                      only: list[str] | None = None, repack: str = "auto", prompt: str | None = None,
                      pin: list[tuple[int, int]] | None = None, replay: str | Path | None = None) -> dict:
    """Decode tok/s, major faults and storage bytes per token of each configuration (full, then uniform
    and lexi at each stored budget: lexi_gguf.measure.configs.run_configs) under a memory limit; each
    configuration and repetition in a fresh child inside a fresh memory cgroup. Same shape as
    lexi_gguf.measure.bench.bench (rows + machine) plus the limit, the model size, the disk and its rates.
    prefetch: expert prefetch modes to run each configuration with (runtime.set_prefetch); only: the
    configuration labels to run (e.g. ["full", "lexi 0.75"]), default all. repack: the children's
    runtime.placement mode (auto: off when the model is larger than the group's room or prefetch is on).
    prompt: decode this prompt's continuation, sampled (seeded), instead of random token ids. pin: (file
    offset, length) ranges each child mlocks after loading (bench/pin.py: the hot-expert experiment).
    replay: a trace file whose routing each child runs (runtime.replay), each layer at its k."""
    from ..bench import backend_name
    from ..configs import run_configs
    from ...runtime.cpu import machine
    from ...gguf.reader import active, footprint

    limit = parse_size(mem_limit)
    check_limit(limit)
    version, base = detect(cgroup_root)
    if os.geteuid() != 0:   # say it before any work is done
        raise LexiError(f"--mem-limit needs root: creating a memory cgroup under {base} is not allowed for "
                        f"uid {os.geteuid()}; run the bench as root (e.g. with sudo)")
    path = Path(path)
    from .pagecache import set_files
    model_bytes = sum(f.stat().st_size for f in set_files(path))      # every shard of a split set
    fp = footprint(path)
    from ...runtime.options import PREFETCH_MODES
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
    if replay is not None:      # refused here, in one line, rather than in every child
        from ...runtime.replay import fits
        from ...runtime.trace import Trace
        tr = Trace.load(replay)
        for c in configs:
            fits(tr, path, c.counts)
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
                        "seed": seed, "cgroup": str(g.path), "version": g.version, "limit": limit, "prefetch": pf,
                        "repack": repack, "prompt": prompt, "pin": pin,
                        "replay": str(replay) if replay is not None else None, "counts": c.counts}
                r = run_child(spec, timeout=timeout)
                r["peak_bytes"] = g.peak()
                r["cgroup_path"] = str(g.path)
            runs.append(r)
        tps = [n_gen / r["decode_s"] for r in runs]
        med = runs[sorted(range(reps), key=lambda i: tps[i])[reps // 2]]
        b = active(fp, c.counts)[0]
        row = {"config": c.config, "budget": c.budget, "avg_k": c.avg_k, "expert_used_count": c.counts, "prefetch": pf,
               "repacked": med.get("repacked"),
               "active_bytes": b, "ideal_speedup": full_bytes / b,
               "tg_tps": statistics.median(tps), "tg_min": min(tps), "tg_max": max(tps),
               "majflt_per_token": med["majflt"] / n_gen,
               "read_bytes_per_token": med["read_bytes"] / n_gen if med["read_bytes"] is not None else None,
               "peak_bytes": med["peak_bytes"], "pinned_bytes": med.get("pinned_bytes", 0), "reps": runs}
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
        pin = f" + {r['pinned_bytes'] / 2**20:.0f} MiB pinned" if r.get("pinned_bytes") else ""
        lines.append(f"| {r['config']}{pin} | {r['budget']:g} | {r.get('prefetch', 'off')} | {r['avg_k']:.2f} | {r['tg_tps']:.2f} "
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
    from ...runtime.options import PREFETCH_MODES
    from ..plots import pyplot
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, key, name, scale in ((axes[0], "tg_tps", "decode tok/s", 1), (axes[1], "majflt_per_token",
                                                                            "major faults / token", 1),
                                 (axes[2], "read_bytes_per_token", "MB read / token", 1e-6)):
        modes = sorted({r.get("prefetch", "off") for r in res["rows"]}, key=list(PREFETCH_MODES).index)
        for cfg, style in (("full", "s:"), ("uniform", "o--"), ("lexi", "^-")):
            for pf, color in zip(modes, ("k", "C1", "C2", "C3")):
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
