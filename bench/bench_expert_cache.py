#!/usr/bin/env python3
"""The runtime expert cache (issue 30: `--expert-cache`, runtime.expertcache) on a true-size file with
replayed routing, beside stock mmap and prefetch chosen under the same memory.

File: `lexi-gguf synth --like qwen3-30b-a3b --quant Q4_K_M` (48 MoE blocks x 128 experts, k 8, ~17.3
GiB, random weights; synth's cache). Routing: replayed from the same SYNTHETIC trace bench_true_size.py
makes (DeepSeek-V2-Lite's statistics at this shape; not a recording). Full k.

Each run is one memory-limited child (lexi_gguf.measure.memlimit: a fresh memory cgroup of 1/2 or 1/4
of the file, the file evicted first, warm-up, then timed decode tokens; tok/s, MB read from storage per
token, the group's peak). The cache runs INSIDE the same limit, with SIZE = the limit less the
non-expert weights and a margin for the process's anonymous memory, so the comparison is at equal
memory; its own counters (hit rate, MB asked for per token, evictions) and the resident expert bytes
(mincore) after the decode are kept. Stock mmap and prefetch chosen at the same limits are taken from
bench_true_size's result for the same file and trace (`--baseline`, default
bench/results/true-size-<machine>.json) when it has them, else measured here (`--measure-baseline`).
Targets (issue 30): file 2x the cache >= 5x stock mmap tok/s; file 4x: >= 5x stock and >= 0.6 of the
disk-bound rate; the policy >= 1.3x prefetch chosen at 4x; memory never above SIZE + 5 %.

    sudo .venv/bin/python bench/bench_expert_cache.py [--limits 0.5,0.25] [--policies nextuse,lru,learned] [--n-gen 8]
        [--warmup 8] [--reps 3] [--stock-reps 1] [--measure-baseline]
Each cache row and prefetch chosen are the median of --reps fresh children; stock mmap (20x slower, 3-4 min
a run) of --stock-reps.
--quick: the shape's first 4 blocks, a limit of 0.9 of that file, one policy, 4 tokens.

--widen-testbed FACTOR: the other regime (a layer computes about as long as its misses take to read): the
trained caching testbed with experts widened FACTOR times (bench_memlimit.widened_testbed: trained
routing, 3.2 MB experts at 54), decoding a held-out prompt's sampled continuation; `learned` starts from
co-activation counted on a trace of 8 other held-out prompts (disjoint). No disk-bound column (no trace
to replay through MIN at these tokens).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python bench/bench_expert_cache.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as C  # noqa: E402

WARMUP = 4
ANON_MARGIN = 768 * 2**20      # the process's anonymous memory inside the limit (KV, compute buffers, Python)


def baselines(path: Path, fractions, args) -> dict:
    """(fraction, prefetch) -> the full-k row of bench_true_size's limited runs of this file."""
    f = Path(args.baseline) if args.baseline else C.result_path("true-size")
    if not f.exists():
        return {}
    d = json.loads(f.read_text())
    if d.get("file") != path.name:
        return {}
    out = {}
    for lim in d.get("limited", []):
        for r in lim.get("rows", []):
            if r.get("config") == "full" and lim.get("fraction") in fractions:
                out[(lim["fraction"], r["prefetch"])] = {"tok_s": r["tg_tps"],
                                                         "mb_read_per_token": (r.get("read_bytes_per_token") or 0) / 1e6,
                                                         "from": f"{f.name} ({d.get('commit')}, {d.get('date')})"}
    return out


def main() -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--limits", default="0.5,0.25", help="memory limits as fractions of the file")
    ap.add_argument("--policies", default="nextuse,lru")
    ap.add_argument("--n-gen", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=WARMUP, help="decode tokens before the timed ones")
    ap.add_argument("--reps", type=int, default=1, help="fresh children per cache row and prefetch chosen (median)")
    ap.add_argument("--stock-reps", type=int, default=1, help="fresh children per stock mmap row (median)")
    ap.add_argument("--baseline", help="a bench_true_size result of the same file (stock mmap and prefetch rows)")
    ap.add_argument("--measure-baseline", action="store_true", help="measure stock mmap and prefetch chosen here")
    ap.add_argument("--file", metavar="GGUF", help="run this file of the qwen3-30b-a3b shape instead of synth's (e.g. "
                    "the same file split into shards by llama-gguf-split: give the first)")
    ap.add_argument("--variant", help="a name for the results file (e.g. split)")
    ap.add_argument("--widen-testbed", type=int, metavar="FACTOR", help="the trained caching testbed, experts "
                    "widened FACTOR times, decoding sampled text (the compute ~ transfer regime)")
    ap.add_argument("--disk-bound", metavar="JSON", help="measure nothing: add the disk-bound columns (Belady's bytes "
                    "per token, simulated; the read rates the run probed) to this result of the same file")
    args = ap.parse_args()
    from lexi_gguf.gguf.reader import footprint, model_info
    from lexi_gguf.measure.memlimit import bench_mem_limited
    from lexi_gguf.measure.memlimit.cgroup import memory_cgroup
    from lexi_gguf.measure.memlimit.child import run_child
    from lexi_gguf.testbeds import shapes, synth
    from bench.bench_true_size import routing
    full_shape = shapes.get("qwen3-30b-a3b")
    shape = shapes.reduced(full_shape, layers=4) if args.quick else full_shape
    limits = [0.9] if args.quick else [float(x) for x in args.limits.split(",")]   # 4 blocks: the non-expert share is large
    policies = args.policies.split(",")[: 1 if args.quick else None]
    n_gen = 4 if args.quick else args.n_gen
    run = C.Run(args, "expert-cache", "widened" if args.widen_testbed else args.variant)
    work = C.WORK / "true-size"
    work.mkdir(parents=True, exist_ok=True)
    args.trace, args.quant = None, "Q4_K_M"
    prompt = predictor = None
    margin = ANON_MARGIN // 3 if args.quick else ANON_MARGIN
    if args.widen_testbed:
        path, prompt, predictor = _widened(args, args.warmup + n_gen)
        margin, trace_path = ANON_MARGIN // 3, None      # a 1.5 GiB model: a smaller process
    else:
        path = Path(args.file or synth.synth(shape, "Q4_K_M", full_layers=full_shape.layers)["path"])
        trace_path = routing(args, shape, work, 512)
    from lexi_gguf.measure.memlimit.pagecache import set_files
    files = set_files(path)
    size = sum(f.stat().st_size for f in files)      # every shard of a split set
    info, fp = model_info(path), footprint(path)
    expert_total = sum(fp["expert_bytes"][i] * info.expert_count for i in info.moe_layers)
    non_expert = size - expert_total
    counts = [info.expert_used_count if i in info.moe_layers else 0 for i in range(info.block_count)]
    if args.disk_bound:
        prev = json.loads(Path(args.disk_bound).read_text())
        if prev.get("file") != path.name or not prev.get("disk_seq_read_mb_s"):
            raise SystemExit(f"--disk-bound: {args.disk_bound} is not a run of {path.name} with its disk probes")
        rows = prev["rows"]
        disk = prev["disk_seq_read_mb_s"]
        _disk_bound(rows, trace_path, info, expert_total, sum(disk) / len(disk), prev["n_gen"], prev.get("warmup", WARMUP))
        keep = {k: v for k, v in prev.items() if k not in ("kind", "variant", "quick", "targets_met")}
        keep["measured"] = {k: prev.get(k) for k in ("commit", "date", "dirty")}
        res = {**keep, "rows": rows, "targets_met": _targets(rows)}
        run.save(res)
        _plot(run, res)
        return 0
    base = {} if args.measure_baseline else baselines(path, limits, args)
    disk = [_seq_rate(path)]      # the virtual disk's rate moves between runs: probed before and after
    rows = []
    for frac in limits:
        limit = int(size * frac)
        if args.measure_baseline or not any(k[0] == frac for k in base):
            for pf, reps in (("off", args.stock_reps), ("chosen", args.reps)):
                res = bench_mem_limited(path, [0.75], mem_limit=limit, n_gen=n_gen, warmup=args.warmup, reps=reps,
                                        threads=args.threads, prefetch=(pf,), only=["full"], replay=trace_path,
                                        rates=False, prompt=prompt)
                for r in res["rows"]:
                    base[(frac, r["prefetch"])] = {"tok_s": r["tg_tps"], "from": "measured here", "reps": reps,
                                                   "tok_s_runs": sorted(n_gen / x["decode_s"] for x in r["reps"]),
                                                   "mb_read_per_token": (r.get("read_bytes_per_token") or 0) / 1e6}
        cache = int(limit - non_expert - margin)
        one_token = sum(fp["expert_bytes"][i] * info.expert_used_count for i in info.moe_layers)
        if cache < one_token:
            raise SystemExit(f"limit {limit / 2**30:.2f} GiB leaves {cache / 2**30:.2f} GiB for experts, below one "
                             f"token's {one_token / 2**30:.2f} GiB: raise --limits")
        for pol in policies:
            runs = []
            for _ in range(1 if args.quick else args.reps):
                with memory_cgroup(limit) as g:
                    spec = {"model": str(path), "kv": {}, "n_gen": n_gen, "warmup": args.warmup, "threads": args.threads,
                            "seed": 0, "cgroup": str(g.path), "version": g.version, "limit": limit, "prefetch": "off",
                            "repack": "auto", "replay": trace_path and str(trace_path), "counts": counts,
                            "prompt": prompt, "expert_cache": str(cache), "cache_policy": pol,
                            "cache_predictor": predictor if pol.startswith("learned") else None}
                    runs.append((run_child(spec), g.peak()))
            runs.sort(key=lambda x: x[0]["decode_s"])
            r, peak = runs[len(runs) // 2]                 # the median run (by decode time)
            tok_s = n_gen / r["decode_s"]
            ec = r["expert_cache"]
            row = {"fraction": frac, "limit_bytes": limit, "cache_bytes": cache, "policy": pol, "tok_s": tok_s,
                   "mb_read_per_token": r["read_bytes"] / 1e6 / n_gen, "peak_bytes": peak,
                   "resident_expert_bytes": ec["resident_expert_bytes"], "hit_rate": ec["hit_rate"],
                   "mb_asked_per_token": ec["mb_asked_per_token"], "evictions": ec["evictions"],
                   "evict_call": ec["evict_call"], "callback_seconds": ec["callback_seconds"],
                   "io_seconds": ec.get("io_seconds"), "stray_bytes": ec.get("stray_bytes"),
                   "refolios": ec.get("refolios"), "load_s": r["load_s"], "token_ms": r["token_ms"],
                   "tok_s_runs": sorted(n_gen / x["decode_s"] for x, _ in runs), "lookahead": ec.get("lookahead")}
            row["within_budget"] = all(x["expert_cache"]["resident_expert_bytes"] <= 1.05 * cache for x, _ in runs)
            for pf in ("off", "chosen"):
                b = base.get((frac, pf))
                row[f"vs_{'stock' if pf == 'off' else 'prefetch'}"] = tok_s / b["tok_s"] if b else None
            rows.append(row)
            print(f"  1/{1 / frac:g} of the file, cache {cache / 2**30:.2f} GiB, {pol}: {tok_s:.3f} tok/s, "
                  f"{row['mb_read_per_token']:.0f} MB read/token, hit rate {ec['hit_rate']:.3f}, resident experts "
                  f"{ec['resident_expert_bytes'] / 2**30:.2f} GiB", flush=True)
    disk.append(_seq_rate(path))
    if trace_path is not None:
        _disk_bound(rows, trace_path, info, expert_total, sum(disk) / len(disk), n_gen, args.warmup)
    res = {"file": path.name, "shards": len(files), "file_bytes": size, "blocks": info.block_count,
           "non_expert_bytes": non_expert,
           "expert_bytes_total": expert_total, "warmup": args.warmup,
           "routing": ("trained (the caching testbed's router), sampled text" if args.widen_testbed
                       else "SYNTHETIC (bench_true_size.routing)"), "cache_predictor": predictor,
           "reps": args.reps, "stock_reps": args.stock_reps,
           "n_gen": n_gen, "threads": args.threads, "anon_margin_bytes": ANON_MARGIN, "rows": rows,
           "baselines": [{"fraction": k[0], "prefetch": k[1], **v} for k, v in sorted(base.items())],
           "disk_seq_read_mb_s": disk, "load_avg": os.getloadavg(),
           "targets_met": {} if args.widen_testbed else _targets(rows)}     # issue 30's targets are for true-size files
    run.save(res)
    _plot(run, res)
    return 0


def _widened(args, n_tokens: int):
    """(file, prompt, trace of 8 other held-out prompts for `learned`'s co-activation counts)."""
    from lexi_gguf.caching.experiment import TEMPERATURE, held_out_prompts, testbed_gguf
    from lexi_gguf.runtime.trace import record
    from lexi_gguf.testbeds.builtin import ensure_default_model
    from bench.bench_memlimit import widened_testbed
    out = C.WORK / "memlimit"
    path, prompt, _ = widened_testbed(out, args.widen_testbed, n_tokens, args.threads)
    tr_path = out / f"{path.stem}-predictor-trace.npz"
    if not tr_path.exists():
        others = held_out_prompts(ensure_default_model(name="caching"), 8, offset=1)
        record(testbed_gguf(C.WORK, threads=args.threads), prompts=others, max_new_tokens=32, temperature=TEMPERATURE,
               seed=0, progress=False, no_lexi=True, threads=args.threads).save(tr_path)
    return path, prompt, str(tr_path)


def _seq_rate(path) -> float:
    """The file's sequential read rate now, MB/s (measure.memlimit.disk.disk_rates' first probe)."""
    from lexi_gguf.measure.memlimit.disk import disk_rates
    return round(disk_rates(path, seconds=3.0, max_random=0)["seq_read_bytes_per_s"] / 1e6, 1)


def _disk_bound(rows, trace_path, info, expert_total: float, seq_mb_s: float, n_gen: int, warmup: int = WARMUP) -> None:
    """Each row's disk-bound rate: the sequential read rate (mean of the probes) / the bytes a timed token
    reads at Belady's MIN with the cache's capacity (bench_true_size.simulate, cold start as there)."""
    from lexi_gguf.runtime.trace import Trace
    from bench.bench_true_size import simulate
    trace = Trace.load(trace_path)
    counts = [info.expert_used_count] * len(trace.moe_layers)
    for r in rows:
        bel = simulate(trace, counts, capacity=r["cache_bytes"] / expert_total, link=f"{seq_mb_s / 1e3},100",
                       depth=1, compute_s=0.0, n_gen=n_gen, policy="belady", warmup=warmup)
        r["belady_mb_per_token"] = float(bel["mb_per_token"])
        r["disk_bound_tps"] = float(seq_mb_s / max(bel["mb_per_token"], 1e-6))
        r["vs_disk_bound"] = r["tok_s"] / r["disk_bound_tps"]


def _targets(rows) -> dict:
    def best(frac, key):
        xs = [r[key] for r in rows if r["fraction"] == frac and r.get(key)]
        return max(xs) if xs else None
    out = {"memory never above SIZE + 5 %": all(r["within_budget"] for r in rows)}
    for frac, name in ((0.5, "file 2x"), (0.25, "file 4x")):
        s = best(frac, "vs_stock")
        if s is not None:
            out[f"{name}: >= 5x stock mmap"] = s >= 5
    p = best(0.25, "vs_prefetch")
    if p is not None:
        out["file 4x: >= 1.3x prefetch chosen"] = p >= 1.3
    d = best(0.25, "vs_disk_bound")
    if d is not None:
        out["file 4x: >= 0.6 of the disk-bound rate"] = d >= 0.6
    return out


def _plot(run, res) -> None:
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    fr = sorted({r["fraction"] for r in res["rows"]}, reverse=True)
    x = range(len(fr))
    for i, (label, get) in enumerate([("stock mmap", lambda f: _b(res, f, "off")),
                                      ("prefetch chosen", lambda f: _b(res, f, "chosen"))] +
                                     [(f"cache {p}", (lambda p: lambda f: next((r["tok_s"] for r in res["rows"]
                                       if r["fraction"] == f and r["policy"] == p), 0))(p))
                                      for p in sorted({r["policy"] for r in res["rows"]})]):
        ax.bar([xi + 0.2 * i for xi in x], [get(f) or 0 for f in fr], width=0.2, label=label)
    ax.set_xticks([xi + 0.3 for xi in x], [f"limit 1/{1 / f:g} of the file" for f in fr])
    ax.set_ylabel("decode tok/s")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(f"{res['file']}: expert cache vs stock mmap, same memory")
    fig.tight_layout()
    run.plot(fig)


def _b(res, f, pf):
    return next((b["tok_s"] for b in res["baselines"] if b["fraction"] == f and b["prefetch"] == pf), None)


if __name__ == "__main__":
    sys.exit(main())
