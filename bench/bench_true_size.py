#!/usr/bin/env python3
"""A released MoE's shape at the size users run, decoded with replayed routing: in RAM, and under
memory limits of 1/2 and 1/4 of the file; each measured run beside the clocked simulator's prediction
for the same trace, disk and compute (issue 29: the simulator checked against the runtime).

File: `lexi-gguf synth --like qwen3-30b-a3b --quant Q4_K_M` (48 MoE blocks x 128 experts, k 8, the
real vocabulary, random weights in valid blocks, ~17.3 GiB; synth's cache). Routing: replayed
(`--routing-replay`), so the bytes each token reads follow a trace and not the random router: by
default a SYNTHETIC trace at this shape (lexi_gguf.caching.synthroute, DeepSeek-V2-Lite's stated
statistics: ~28 % of a layer's experts shared between tokens; not a recording), or `--trace FILE` (any
trace that fits: `trace import --like qwen3-30b-a3b`). Each layer keeps its k_j best recorded experts.

Measured (lexi_gguf.measure): in RAM, `bench` full / uniform / LExI 0.75 / 0.5 (tok/s, the ideal from
active bytes); under each limit, `bench --mem-limit` full and LExI 0.75, stock mmap (prefetch off) and
prefetch chosen (tok/s, MB read per token). Simulated (lexi_gguf.caching.clock, stated cost model): the
same trace rows (warm-up, then the timed tokens), the experts' cache = the limit less the non-expert
weights and the process's anonymous memory, the compute per MoE layer = the in-RAM decode time of that
configuration / MoE layers, the link = the disk as measured on this file: stock mmap = demand LRU where
a miss is one page fault per expert tensor, each reading the measured fault window (read-around) at the
measured fault rate, the same memory holding that many fewer experts; prefetch chosen = demand LRU
over the measured sequential rate with 4K-read latency and 32 requests in flight. Belady's bytes per
token give the disk-bound rate (sequential rate / Belady bytes per token). Needs root (memory cgroups).

    sudo .venv/bin/python bench/bench_true_size.py [--limits 0.5,0.25] [--n-gen 16] [--trace FILE]
--quick: the shape's first 4 blocks, one limit, 4 tokens.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python bench/bench_true_size.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as C  # noqa: E402

WARMUP = 4
N_TENSORS = 3          # gate, up, down: one expert's slices, each faulted separately by stock mmap


def routing(args, shape, out_dir: Path, n_tokens: int) -> Path:
    from lexi_gguf.caching.synthroute import PRESETS, synth_trace
    from lexi_gguf.testbeds import shapes
    if args.trace:
        return Path(args.trace)
    eb = shapes.expert_bytes(shape, args.quant)
    # the preset of the same routing shape where there is one (mixtral), else DeepSeek-V2-Lite's statistics
    preset = shape.name if shape.name in PRESETS else "deepseek-v2-lite"
    tr = synth_trace(preset, seqs=1, tokens=n_tokens, seed=0, layers=len(shape.moe_layers),
                     first_moe=shape.moe_layers[0], experts=shape.experts, k=shape.k, expert_bytes=eb[0])
    tr.meta["model"] = f"SYNTHETIC routing ({preset} statistics) at the {shape.name} shape"
    tr.meta["expert_bytes"] = list(eb)
    return tr.save(out_dir / f"routing-{shape.name}-{shape.layers}L-{n_tokens}.npz")


def simulate(trace, counts_moe: list[int], *, capacity: float, link: str, depth: int, compute_s: float,
             n_gen: int, policy: str = "lru", miss_bytes: float | None = None, warmup: int = WARMUP) -> dict:
    """ms per timed token and bytes per timed token: the warm-up rows, then the timed rows, cold start.
    miss_bytes: what one miss reads instead of the expert's bytes (stock mmap: its fault windows); the
    same memory then holds fewer experts (capacity scaled by expert bytes / miss bytes)."""
    import numpy as np

    from lexi_gguf.caching.clock import simulate_clocked
    from lexi_gguf.caching.simulate import with_counts
    from lexi_gguf.runtime.trace import Trace
    tr = with_counts(trace, counts_moe)
    if miss_bytes is not None:
        eb = list(tr.meta["expert_bytes"])
        capacity *= (sum(eb) / len(eb)) / miss_bytes
        tr.meta = dict(tr.meta, expert_bytes=[miss_bytes] * len(eb))

    def first(n: int) -> dict:
        sub = Trace(tr.tokens[:n], np.ones(n, bool), np.zeros(n, np.int32), tr.moe_layers, tr.counts,
                    tr.experts[:n], tr.weights[:n], None, tr.meta)
        return simulate_clocked(sub, capacity, policy, link=link, compute_s=compute_s, phase="all",
                                queue_depth=depth).row()
    a, b = first(warmup), first(warmup + n_gen)
    ms = (b["ms_per_token"] * (warmup + n_gen) - a["ms_per_token"] * warmup) / n_gen
    mb = (b["mb_per_token"] * (warmup + n_gen) - a["mb_per_token"] * warmup) / n_gen
    return {"ms_per_token": ms, "mb_per_token": mb, "hit_rate": b["hit_rate"]}


def main() -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--like", default="qwen3-30b-a3b")
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--limits", default="0.5,0.25", help="memory limits as fractions of the file")
    ap.add_argument("--n-gen", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3, help="in-RAM repetitions")
    ap.add_argument("--trace", help="a trace that fits the shape (default: synthetic routing)")
    ap.add_argument("--resimulate", metavar="JSON", help="measure nothing: the simulator's columns of this result "
                    "again with today's cost model (the measured rows are kept; the JSON says so)")
    ap.add_argument("--reuse-ram", metavar="JSON", help="take the in-RAM measurements from this earlier result of "
                    "the same file instead of measuring them again (only the limited runs are measured)")
    args = ap.parse_args()
    from lexi_gguf.testbeds import shapes, synth
    full_shape = shapes.get(args.like)
    shape = shapes.reduced(full_shape, layers=4) if args.quick else full_shape
    limits = [float(x) for x in args.limits.split(",")][: 1 if args.quick else None]
    n_gen = 4 if args.quick else args.n_gen
    run = C.Run(args, "true-size", None if args.like == "qwen3-30b-a3b" else args.like)
    work = C.WORK / "true-size"
    work.mkdir(parents=True, exist_ok=True)

    from lexi_gguf.gguf.reader import footprint, model_info
    from lexi_gguf.measure.bench import bench
    from lexi_gguf.measure.memlimit import bench_mem_limited
    from lexi_gguf.runtime.trace import Trace
    made = synth.synth(shape, args.quant, full_layers=full_shape.layers)
    path = Path(made["path"])
    size = path.stat().st_size
    info = model_info(path)
    fp = footprint(path)
    trace_path = routing(args, shape, work, 512)
    trace = Trace.load(trace_path)
    print(f"file {path.name}: {size / 2**30:.1f} GiB; routing: {trace.meta.get('model')}", flush=True)

    import json
    if args.resimulate:
        prev = json.loads(Path(args.resimulate).read_text())
        if prev.get("file") != path.name:
            raise SystemExit(f"--resimulate: {args.resimulate} measured {prev.get('file')}, not {path.name}")
        ram = prev["in_ram"]
        n_ram = len([i for i in info.moe_layers if i < ram.get("blocks", shape.layers)])
        sims = []
        for lim in prev["limited"]:
            sims += simulate_limit(lim, trace, info, prev["expert_bytes_total"], prev["non_expert_bytes"],
                                   _compute(ram, n_ram), prev["n_gen"])
        keep = {k: v for k, v in prev.items() if k not in ("kind", "variant", "quick", "targets_met", "sim")}
        keep["measured"] = {k: prev.get(k) for k in ("commit", "date", "dirty")}
        return _finish(run, {**keep, "sim": sims}, ram)

    # in RAM: every configuration, replayed routing (the decode speed-up at true size, issue 32); the
    # file read once first, so the first configuration does not pay for the page cache. A file larger
    # than the memory there is: its first blocks that fit (compute per MoE layer is the same)
    import subprocess
    if args.reuse_ram:
        prev = json.loads(Path(args.reuse_ram).read_text())
        if prev.get("file") != path.name:
            raise SystemExit(f"--reuse-ram: {args.reuse_ram} measured {prev.get('file')}, not {path.name}")
        ram = dict(prev["in_ram"], reused_from=f"{prev.get('commit')} {prev.get('date')}")
        ram.setdefault("blocks", shape.layers)
    else:
        ram_path, ram_blocks = path, shape.layers
        avail = _mem_available()
        if size > 0.8 * avail:
            per_block = (size - fp["fixed_bytes"]) / shape.layers
            # ggml repacks Q4_K into anonymous memory: the page cache and the copy both fit
            ram_blocks = max(1, int((0.3 * avail) // per_block))
            ram_path = Path(synth.synth(shapes.reduced(shape, layers=ram_blocks), args.quant,
                                        full_layers=full_shape.layers)["path"])
            print(f"in RAM: the first {ram_blocks} of {shape.layers} blocks ({ram_path.stat().st_size / 2**30:.1f} GiB)")
        subprocess.run(["cat", str(ram_path)], stdout=subprocess.DEVNULL, check=True)
        ram = bench(ram_path, _stored_near(ram_path, [0.75, 0.5]), n_prompt=16, n_gen=16 if args.quick else 32,
                    reps=1 if args.quick else args.reps, threads=args.threads,
                    replay=trace if ram_blocks == shape.layers else _first_layers(trace, ram_blocks))
        ram["blocks"] = ram_blocks
    ram_blocks = ram["blocks"]
    n_ram_moe = len([i for i in info.moe_layers if i < ram_blocks])
    compute = _compute(ram, n_ram_moe)
    expert_total = sum(fp["expert_bytes"][i] * info.expert_count for i in info.moe_layers)
    non_expert = size - expert_total

    limited, sims = [], []
    for frac in limits:
        limit = int(size * frac)
        b75 = _stored_near(path, [0.75])[0]
        res = bench_mem_limited(path, [b75], mem_limit=limit, n_gen=n_gen, warmup=WARMUP, threads=args.threads,
                                prefetch=("off", "chosen"), only=["full", f"lexi {b75:g}"], replay=trace_path,
                                rates=True, reps=1)
        res["fraction"] = frac
        limited.append(res)
        sims += simulate_limit(res, trace, info, expert_total, non_expert, compute, n_gen)
    res = {"file": path.name, "file_bytes": size, "shape": shape.name, "quant": args.quant, "blocks": shape.layers,
           "non_expert_bytes": non_expert, "expert_bytes_total": expert_total, "synth_seconds": made["seconds"],
           "routing": trace.meta.get("model"), "synthetic_routing": bool(trace.meta.get("synthetic")),
           "warmup": WARMUP, "n_gen": n_gen, "threads": args.threads, "in_ram": ram, "limited": limited, "sim": sims}
    return _finish(run, res, ram)


def _compute(ram: dict, n_ram_moe: int):
    def compute(r: dict) -> float:
        """seconds per MoE layer in RAM of the same configuration at the nearest average k"""
        same = [x for x in ram["rows"] if x["config"] == r["config"]]
        x = min(same, key=lambda x: abs(x["avg_k"] - r["avg_k"]))
        return 1.0 / x["tg_tps"] / n_ram_moe
    return compute


def _finish(run, res: dict, ram: dict) -> int:
    sims = res["sim"]
    print("\n| limit | config | mode | tok/s | MB read/tok | disk-bound tok/s (Belady) | simulated ms/tok | measured ms/tok | sim error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in sims:
        print(f"| {s['fraction']:g} x file | {s['config']} {s['budget']:g} | {s['prefetch']} | {s['measured_tps']:.2f} | "
              f"{s['measured_mb_per_token']:.0f} | {s['disk_bound_tps']:.2f} | {s['simulated_ms_per_token']:.0f} | "
              f"{s['measured_ms_per_token']:.0f} | {s['sim_error']:+.0%} |")
    res["targets_met"] = {"simulated within 25 % of measured (every mode)": all(abs(s["sim_error"]) <= 0.25 for s in sims),
                          "LExI 0.75 >= 0.9 of its ideal decode speed-up in RAM": _ideal_share(ram) >= 0.9}
    run.save(res)
    plot(run, res)
    return 0


def simulate_limit(res: dict, trace, info, expert_total: float, non_expert: float, compute, n_gen: int) -> list[dict]:
    """The clocked simulator beside each measured row of one memory limit (the cost model: module doc)."""
    import math
    limit, frac = res["mem_limit_bytes"], res["fraction"]
    d = res["disk_rates"]
    seq, r4k = d.get("seq_read_bytes_per_s"), d.get("random_4k_reads_per_s")
    mm = d.get("mmap_read_bytes_per_s") or seq
    # stock mmap: each tensor slice of a missing expert is faulted in window by window (the measured
    # read-around window), at the measured fault read rate; prefetch chosen: whole experts, the
    # sequential rate, a 4K read's latency, a deep queue (madvise WILLNEED)
    window = d.get("mmap_bytes_per_fault") or 0
    eb = [x for x in trace.meta["expert_bytes"]]
    slice_b = sum(eb) / len(eb) / N_TENSORS
    miss_off = N_TENSORS * math.ceil(slice_b / window) * window if window else None
    links = {"off": (f"{mm / 1e9:.4f},0", 1, miss_off), "chosen": (f"{seq / 1e9:.4f},{1e6 / r4k:.1f}", 32, None)}
    out = []
    for r in res["rows"]:
        med = r["reps"][0]
        cap = max(limit - non_expert - (med.get("rss_anon_bytes") or 0), 0) / expert_total
        counts_moe = [r["expert_used_count"][i] for i in info.moe_layers]
        link, depth, miss = links[r["prefetch"]]
        sim = simulate(trace, counts_moe, capacity=cap, link=link, depth=depth, compute_s=compute(r), n_gen=n_gen,
                       miss_bytes=miss)
        bel = simulate(trace, counts_moe, capacity=cap, link=link, depth=depth, compute_s=compute(r), n_gen=n_gen,
                       policy="belady")
        meas_ms = 1e3 / r["tg_tps"]
        out.append({"fraction": frac, "config": r["config"], "budget": r["budget"], "prefetch": r["prefetch"],
                    "capacity": cap, "link": link, "queue_depth": depth, "miss_bytes": miss,
                    "measured_ms_per_token": meas_ms, "simulated_ms_per_token": sim["ms_per_token"],
                    "sim_error": sim["ms_per_token"] / meas_ms - 1,
                    "measured_mb_per_token": (r.get("read_bytes_per_token") or 0) / 1e6,
                    "simulated_mb_per_token": sim["mb_per_token"], "simulated_hit_rate": sim["hit_rate"],
                    "belady_mb_per_token": bel["mb_per_token"], "disk_bound_tps": seq / max(bel["mb_per_token"] * 1e6, 1.0),
                    "measured_tps": r["tg_tps"]})
    return out


def _stored_near(path, wanted: list[float]) -> list[float]:
    """The budgets the file stores nearest to each wanted one (a file's ladder steps by its k and layers)."""
    from lexi_gguf.gguf.reader import model_info, read_ladder
    have = [r["budget"] for r in read_ladder(model_info(path))]
    return [min(have, key=lambda b: abs(b - w)) for w in wanted]


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _first_layers(trace, n_blocks: int):
    """The trace's columns of the MoE layers among the first n_blocks blocks."""
    from lexi_gguf.runtime.trace import Trace
    keep = [j for j, il in enumerate(trace.moe_layers) if il < n_blocks]
    return Trace(trace.tokens, trace.generated, trace.seq, trace.moe_layers[keep], trace.counts[keep],
                 trace.experts[:, keep], trace.weights[:, keep], None,
                 dict(trace.meta, expert_bytes=[trace.meta["expert_bytes"][j] for j in keep]))


def _ideal_share(ram: dict) -> float:
    r = min((r for r in ram["rows"] if r["config"] == "lexi"), key=lambda r: abs(r["budget"] - 0.75))
    return r["tg_speedup"] / r["ideal_speedup"]


def plot(run, res: dict) -> None:
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for i, s in enumerate(res["sim"]):
        lab = f"{s['fraction']:g}x {s['config']} {s['budget']:g} {s['prefetch']}"
        ax.barh(i - 0.2, s["measured_ms_per_token"], 0.4, color="C0", label="measured" if i == 0 else None)
        ax.barh(i + 0.2, s["simulated_ms_per_token"], 0.4, color="C1", label="simulated" if i == 0 else None)
        ax.text(0, i, f" {lab}", va="center", fontsize=7)
    ax.set_yticks([])
    ax.set_xlabel("ms per token (decode, replayed routing)")
    ax.set_title(f"{res['shape']} {res['quant']} ({res['file_bytes'] / 2**30:.1f} GiB) under memory limits, "
                 f"{C.machine()['cpu_class']}", fontsize=8)
    ax.legend(fontsize=7)
    run.plot(fig)


if __name__ == "__main__":
    sys.exit(main())
