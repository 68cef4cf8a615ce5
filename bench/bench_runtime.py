#!/usr/bin/env python3
"""Runtime speed (issue 2): does a layer with fewer experts run faster, as much as its bytes say?

A synthetic OLMoE-shaped model (hidden 2048, 64 experts, expert ffn 1024, 4 layers, base k 8), built
from a transformers config with random bf16 weights, converted to Q8_0 by llama.cpp's converter.
Runs on CPU: full k=8, uniform k=4 (the --override-kv users do today), per-layer [8,4,2,2] (same total).
Targets: per-layer >= 0.97x uniform decode; speed-up over full >= 0.9x the active-bytes ideal.
Results go to bench/results/runtime-<machine id>.json. --quick: 2 layers, 64/16 tokens, one repetition.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python bench/bench_runtime.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as C  # noqa: E402


def main() -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--work", default=str(C.WORK))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--pattern", default="8,4,2,2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-prompt", type=int, default=512)
    ap.add_argument("--n-gen", type=int, default=128)
    args = ap.parse_args()
    if args.quick:
        args.layers, args.pattern, args.reps, args.n_prompt, args.n_gen = 2, "8,4", 1, 64, 16
    run = C.Run(args, "runtime")
    from bench.models import olmoe_shaped
    from lexi_gguf.export.apply import apply
    from lexi_gguf.gguf.reader import active, footprint, model_info
    from lexi_gguf.measure.bench import measure
    from lexi_gguf.runtime.llama import lexi_overrides

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = olmoe_shaped(work, args.layers)
    pattern = [int(x) for x in args.pattern.split(",")]
    per_layer = work / f"olmoe-shaped-{args.layers}L-Q8_0-lexi.gguf"
    apply(base, per_layer, k=pattern, force=True, progress=False)
    print(f"model ready in {time.perf_counter() - t0:.0f} s: {base}")
    info = model_info(base)
    fp = footprint(base)
    uni_k = sum(pattern) // len(pattern)
    runs = [("full k=8", per_layer, lexi_overrides(lexi=False), [8] * args.layers),
            (f"uniform k={uni_k}", per_layer, lexi_overrides(info.arch, uniform_k=uni_k), [uni_k] * args.layers),
            (f"per-layer {pattern}", per_layer, {}, pattern)]
    full_b = active(fp, runs[0][3])[0]
    rows = []
    print(f"| run | pp{args.n_prompt} t/s | tg{args.n_gen} t/s | tg speed-up | ideal | of ideal |")
    print("|---|---|---|---|---|---|")
    for name, path, kv, counts in runs:
        m = measure(path, kv, n_prompt=args.n_prompt, n_gen=args.n_gen, reps=args.reps, threads=args.threads)
        ideal = full_b / active(fp, counts)[0]
        rows.append({"run": name, "expert_used_count": counts, "ideal_speedup": ideal, **m})
        full_tg = rows[0]["tg_tps"]
        sp = m["tg_tps"] / full_tg
        rows[-1]["tg_speedup"] = sp
        print(f"| {name} | {m['pp_tps']:.1f} ({m['pp_min']:.1f}-{m['pp_max']:.1f}) | {m['tg_tps']:.2f} "
              f"({m['tg_min']:.2f}-{m['tg_max']:.2f}) | {sp:.2f}x | {ideal:.2f}x | {sp / ideal:.0%} |", flush=True)
    full, uni, per = rows
    targets = {"per_layer_vs_uniform_tg": per["tg_tps"] / uni["tg_tps"],
               "per_layer_speedup_of_ideal": per["tg_speedup"] / per["ideal_speedup"],
               "uniform_speedup_of_ideal": uni["tg_speedup"] / uni["ideal_speedup"]}
    ok = {"per_layer_vs_uniform >= 0.97": targets["per_layer_vs_uniform_tg"] >= 0.97,
          "per_layer_speedup >= 0.9 x ideal": targets["per_layer_speedup_of_ideal"] >= 0.9}
    res = {"model": "synthetic OLMoE-shaped: hidden 2048, 64 experts, expert ffn 1024, "
                    f"{args.layers} layers, base k 8, Q8_0", "threads": args.threads, "n_prompt": args.n_prompt,
           "n_gen": args.n_gen, "reps": args.reps, "rows": rows, "targets": targets, "targets_met": ok}
    run.save(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
