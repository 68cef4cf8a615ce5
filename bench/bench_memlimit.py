#!/usr/bin/env python3
"""A MoE larger than RAM (issue 10): decode under a real memory limit, full k vs uniform vs LExI.

The bench model is OLMoE-shaped (64 experts, base k 8) and about twice the limit: by default 16 layers,
hidden 2048, expert ffn 1024, Q8_0, ~7.3 GB, run under a 3.5 GiB memory cgroup. Nothing that large is
ever materialised as a checkpoint: a tiny OLMoE checkpoint with the same layer/expert counts (hidden
96, expert ffn 32) is converted by llama.cpp's converter and profiled (its LExI ladder 1 / 0.75 / 0.5
is what the big file stores: the allocation of a random-weight model, used here for its per-layer
counts, not for quality), then the big GGUF is written tensor by tensor with gguf-py: the tiny file's
metadata with the sizes scaled up, Q8_0 tensors of random int8 with a fixed fp16 scale, norms 1 and
random f32 routers. Building takes well under a minute plus the disk's write time, cached under
~/.cache/lexi-gguf/bench-models/ (or --out).

Each configuration then runs in a fresh child inside a fresh memory cgroup (lexi_gguf.measure.memlimit):
evict the file, load mmapped, a fixed warm-up, n_gen decode tokens timed, with major faults and bytes
read from storage per token. Needs root (cgroups). Results: bench/results/memlimit[-<name>]-<machine id>.json
+ .png (--name says which experiment: e.g. widened-q4km-ra128).

    sudo .venv/bin/python bench/bench_memlimit.py                       # the ~7.3 GB model, 3.5 GiB limit
    sudo .venv/bin/python bench/bench_memlimit.py --small               # ~280 MB model, 200 MiB limit
    .venv/bin/python bench/bench_memlimit.py --quick                    # --small, 4 tokens; skipped without root
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python bench/bench_memlimit.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as C  # noqa: E402
from bench.models import CACHE, big_olmoe  # noqa: E402

def widened_testbed(out_dir: Path, factor: int, n_tokens: int, threads: int) -> tuple[Path, str, dict]:
    """The trained caching testbed with experts widened `factor` times (cached), a held-out prompt, and
    its routing on that prompt's sampled continuation: consecutive-token expert overlap per MoE layer
    (traced on the small file: the routing is the same)."""
    import numpy as np

    from lexi_gguf.caching.experiment import TEMPERATURE, held_out_prompts, testbed_gguf
    from lexi_gguf.runtime.trace import record
    from lexi_gguf.testbeds.builtin import ensure_default_model

    from bench.widen import widen_experts
    small = testbed_gguf(C.WORK, threads=threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    wide = out_dir / f"{small.stem}-wide{factor}.gguf"
    if not wide.exists():
        widen_experts(small, wide, factor)
    prompt = held_out_prompts(ensure_default_model(name="caching"), 1)[0]
    tr = record(small, prompts=[prompt], max_new_tokens=n_tokens, temperature=TEMPERATURE, seed=0, progress=False,
                no_lexi=True, threads=threads)
    ex = tr.experts[tr.generated]                     # (T, L, k) decode tokens
    k = ex.shape[2]
    overlap = [float(np.mean([len(set(ex[t, j]) & set(ex[t - 1, j])) / k for t in range(1, len(ex))]))
               for j in range(ex.shape[1])]
    return wide, prompt, {"overlap_per_layer": overlap, "overlap_mean": float(np.mean(overlap)), "tokens": len(ex)}


@functools.lru_cache(maxsize=None)
def calibration_trace(threads: int):
    """Routing on other prompts than the bench decodes (held-out prompts 1-8, 32 sampled tokens each,
    full k), traced on the small testbed: the widened one routes the same, with the same expert ids."""
    from lexi_gguf.caching.experiment import TEMPERATURE, held_out_prompts, testbed_gguf
    from lexi_gguf.runtime.trace import record
    from lexi_gguf.testbeds.builtin import ensure_default_model
    prompts = held_out_prompts(ensure_default_model(name="caching"), 8, offset=1)
    return record(testbed_gguf(C.WORK, threads=threads), prompts=prompts, max_new_tokens=32,
                  temperature=TEMPERATURE, seed=0, progress=False, no_lexi=True, threads=threads)


def coactivation_layout(model: Path, threads: int) -> tuple[Path, dict]:
    """`model` (the widened testbed) with each layer's experts in co-activation order (export.relayout,
    cached beside it), learnt from the calibration trace."""
    from lexi_gguf.export.relayout import adjacency, coactivation_orders, relayout
    tr = calibration_trace(threads)
    orders = coactivation_orders(tr)
    out = model.with_name(model.stem + "-coact.gguf")
    if not out.exists():
        relayout(model, out, orders)
    return out, {"calibration_tokens": len(tr.tokens), "adjacent_pairs_id_order": adjacency(tr),
                 "adjacent_pairs_coact_order": adjacency(tr, orders)}


def pin_ranges(model: Path, fraction: float, mem_limit: str, threads: int) -> tuple[list, dict]:
    """The hottest experts of the calibration trace that fill `fraction` of the room the limit leaves
    for experts (limit - non-expert bytes - 64 MiB for the process), as (file offset, length) ranges of
    `model` (through its stored expert order if it was re-laid out)."""
    import numpy as np

    from lexi_gguf.export.relayout import stored_order
    from lexi_gguf.gguf.reader import footprint, model_info, open_one
    from lexi_gguf.measure.memlimit import parse_size

    from bench.pin import expert_ranges, hot_experts
    fp, info = footprint(model), model_info(model)
    expert_total = sum(fp["expert_bytes"][i] for i in info.moe_layers) * info.expert_count
    room = parse_size(mem_limit) - (model.stat().st_size - expert_total) - 64 * 2**20
    ranges = expert_ranges(model)
    hot = hot_experts(calibration_trace(threads), ranges, int(fraction * room))
    pos = np.argsort(stored_order(open_one(model), info.block_count, info.expert_count), axis=1)  # id -> position
    hot = [(blk, int(pos[blk, e])) for blk, e in hot]
    out = [r for x in hot for r in ranges[x]]
    return out, {"fraction_of_room": fraction, "experts": len(hot), "bytes": sum(n for _, n in out),
                 "room_bytes": int(room)}


def belady_replay(wide: Path, res: dict, threads: int) -> None:
    """Each row's bytes read per decode token beside what a Belady-optimal expert cache of the same size
    would read on the same tokens: every run's own token ids are traced again on the file it decoded
    (no limit) and replayed through MIN with as many whole experts as the limit holds once the non-expert
    weights and the process's anonymous memory are in (row["belady_read_bytes_per_token"]). The page cache
    keeps parts of experts, which whole-expert MIN cannot: measured reads can come out below it."""
    import numpy as np

    from lexi_gguf.caching import simulate
    from lexi_gguf.gguf.reader import footprint, model_info
    from lexi_gguf.runtime.trace import record
    fp, info = footprint(wide), model_info(wide)
    moe = list(info.moe_layers)
    eb = float(np.mean([fp["expert_bytes"][i] for i in moe]))
    expert_total = eb * len(moe) * info.expert_count
    traces: dict = {}
    for row in res["rows"]:
        kw = ({"no_lexi": True} if row["config"] == "full" else {"budget": f"{row['budget']:g}"}
              if row["config"] == "lexi" else {"uniform_k": int(row["expert_used_count"][moe[0]])})
        per_run = []
        for run in row["reps"]:
            room = res["mem_limit_bytes"] - (res["model_bytes"] - expert_total) - run["rss_anon_bytes"]
            slots = max(1, int(room // eb))
            key = (tuple(run["tokens"]), row["config"], row["budget"])
            if key not in traces:
                traces[key] = record(wide, tokens=[run["tokens"]], n_ctx=len(run["tokens"]) + 8, threads=threads,
                                     progress=False, **kw)
            tr = traces[key]
            per_run.append(simulate.demand_misses(tr, slots, "belady", run["decode_from"]) * eb / res["n_gen"])
        row["belady_slots"] = slots
        row["belady_read_bytes_per_token"] = float(np.median(per_run))


def main() -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--out", default=str(CACHE), help="where the bench model is built and cached")
    ap.add_argument("--small", action="store_true", help="validation size: hidden 512, ffn 128 (~280 MB), limit 200M")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--ffn", type=int)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--mem-limit", help="memory limit of each run (default 3.5G; 200M with --small)")
    ap.add_argument("--budgets", default="0.75,0.5")
    ap.add_argument("--n-gen", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--prefetch", default="off,chosen,guess", help="expert prefetch modes to compare")
    ap.add_argument("--only", help="configurations to run, e.g. 'full,lexi 0.75,uniform 0.75' (default all)")
    ap.add_argument("--name", help="which experiment, in the results file name: bench/results/memlimit-NAME-<machine "
                    "id>.json (default: none)")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--quant", help="requantize the Q8_0 bench model to this type first (e.g. Q4_K_M; cached)")
    ap.add_argument("--widen-testbed", type=int, metavar="FACTOR",
                    help="instead of the random-weight model: the trained caching testbed (8 layers x 64 experts) "
                    "with experts widened FACTOR times (bench/widen.py: same routing), decoding sampled text")
    ap.add_argument("--relayout", action="store_true",
                    help="with --widen-testbed: run the file with each layer's experts in co-activation order "
                    "(export.relayout, learnt from other prompts than the bench decodes)")
    ap.add_argument("--pin", default="0", help="with --widen-testbed: fractions of the experts' room to pin with "
                    "the calibration trace's hottest experts (mlock; 0 = none), e.g. 0,0.5")
    ap.add_argument("--repack", default="auto", help="repack modes to compare, e.g. on,off (runtime.placement); "
                    "a mode whose children are killed (repacked experts over the limit) is a row saying so")
    args = ap.parse_args()
    if args.quick:
        if os.geteuid() != 0:
            print("bench_memlimit --quick: skipped (memory cgroups need root; run it with sudo)")
            return 0
        args.small, args.layers, args.n_gen, args.warmup, args.prefetch = True, 4, 4, 2, "off,chosen"
    name = args.name.removeprefix("memlimit-").removeprefix("memlimit") if args.name else None
    run = C.Run(args, "memlimit", name or None)
    from lexi_gguf import LexiError
    from lexi_gguf.measure.memlimit import bench_mem_limited, fmt_size, plot, table

    hidden = args.hidden or (512 if args.small else 2048)
    ffn = args.ffn or (128 if args.small else 1024)
    limit = args.mem_limit or ("200M" if args.small else "3.5G")
    prompt, routing = None, None
    if args.widen_testbed:
        model, prompt, routing = widened_testbed(Path(args.out), args.widen_testbed, args.n_gen + args.warmup, args.threads)
    else:
        model = big_olmoe(Path(args.out), hidden=hidden, ffn=ffn, layers=args.layers, experts=args.experts)
    if args.quant:
        from lexi_gguf.export.convert import quantize
        q = model.with_name(model.stem.replace("Q8_0", args.quant) + ".gguf")
        if not q.exists():
            print(f"requantizing to {args.quant} -> {q}", flush=True)
            tmp = q.with_suffix(".tmp")
            quantize(model, tmp, args.quant, threads=args.threads, allow_requantize=True)
            tmp.rename(q)
        model = q
    layout = None
    if args.relayout:
        if not args.widen_testbed:
            raise SystemExit("--relayout needs --widen-testbed (a trained model: random weights have no co-activation)")
        model, layout = coactivation_layout(model, args.threads)
        print(f"co-activation layout {model.name}: co-activated pairs side by side "
              f"{layout['adjacent_pairs_id_order']:.1%} -> {layout['adjacent_pairs_coact_order']:.1%} "
              f"(calibration prompts)", flush=True)
    if args.build_only:
        return 0
    pins = [float(x) for x in args.pin.split(",")]
    if any(pins) and not args.widen_testbed:
        raise SystemExit("--pin needs --widen-testbed (hot experts come from a trained model's routing)")
    res, killed = None, {}
    for mode, frac in ((m, f) for m in args.repack.split(",") for f in pins):
        pin, pin_info = pin_ranges(model, frac, limit, args.threads) if frac else (None, None)
        if pin_info:
            print(f"pinning {pin_info['experts']} hot experts, {pin_info['bytes'] / 2**20:.0f} MiB "
                  f"({frac:g} of {pin_info['room_bytes'] / 2**20:.0f} MiB room)", flush=True)
        try:
            r = bench_mem_limited(model, [float(b) for b in args.budgets.split(",")], mem_limit=limit, n_gen=args.n_gen,
                                  warmup=args.warmup, threads=args.threads, reps=args.reps,
                                  prefetch=tuple(args.prefetch.split(",")),
                                  only=args.only.split(",") if args.only else None, repack=mode, prompt=prompt, pin=pin)
        except LexiError as e:
            print(f"repack {mode}: {e}", file=sys.stderr)
            killed[mode] = str(e)
            continue
        for row in r["rows"]:
            row["repack_mode"] = mode
            row["pin"] = pin_info
        if res is None:
            res = r
        else:
            res["rows"] += r["rows"]
    if res is None:
        print("error: every repack mode failed", file=sys.stderr)
        return 2
    res["failed_repack_modes"] = killed
    if routing:
        belady_replay(model, res, args.threads)
        print("bytes read per decode token, measured vs a Belady-optimal cache of the same size on the same tokens:")
        for r in res["rows"]:
            rb, bel = r.get("read_bytes_per_token") or 0, r["belady_read_bytes_per_token"]
            r["read_vs_belady"] = rb / bel if bel else None
            print(f"  {r['config']} {r['budget']:g} prefetch {r['prefetch']}: {rb / 1e6:.1f} vs Belady {bel / 1e6:.1f} MB "
                  f"({r['belady_slots']} experts fit)" + (f", {rb / bel:.2f}x" if bel else ", Belady reads nothing"))
    if layout:
        res["layout"] = layout
    if routing:
        res["routing"] = routing
        res["bench_model"] = (f"the trained caching testbed, experts widened {args.widen_testbed}x with zeros "
                              f"(same routing), {args.quant or 'Q8_0'}, {fmt_size(res['model_bytes'])}; sampled text"
                              + ("; experts in co-activation order" if layout else ""))
        print("consecutive-token expert overlap per MoE layer (decode, sampled): "
              + " ".join(f"{x:.2f}" for x in routing["overlap_per_layer"]))
    else:
        res["bench_model"] = (f"synthetic OLMoE-shaped: {args.layers} layers x {args.experts} experts, hidden {hidden}, "
                              f"expert ffn {ffn}, base k 8, {args.quant or 'Q8_0'}, {fmt_size(res['model_bytes'])}; LExI "
                              f"ladder of a random-weight template with the same layers/experts")
    print(table(res))
    run.save(res)
    plot(res, run.png)
    print(json.dumps({r["config"] + f" {r['budget']:g} prefetch {r['prefetch']}"
                      + (f" pin {r['pin']['fraction_of_room']:g}" if r.get("pin") else ""): round(r["tg_tps"], 3)
                      for r in res["rows"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
