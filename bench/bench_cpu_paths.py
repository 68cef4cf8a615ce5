#!/usr/bin/env python3
"""What the AMX fix costs (issue 8): the shipped CPU runtime (AMX matmul not compiled in, repack on)
against `--repack 0` (the crude workaround: no repacked GEMM for anyone), prefill and decode, on the
OLMoE-shaped bench model at Q8_0 and Q4_0, measured by the patched tree's own llama-bench.

On an AMX CPU the shipped build runs the AVX512/VNNI repack kernels where upstream would run AMX;
on AVX512 and AVX2 CPUs the shipped build is byte-for-byte the upstream native one. The CPU class
is in the saved result. Results: bench/results/cpu-paths-<machine id>.json (+ .png). --quick: 2 layers,
32/8 tokens, one repetition.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python bench/bench_cpu_paths.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as C  # noqa: E402


def q4_0_model(q8: Path) -> Path:
    """Q4_0 from the Q8_0 bench model with llama.cpp's quantizer (speed, not quality, is measured)."""
    from lexi_gguf.runtime.procs import run_child
    from lexi_gguf.runtime.llama import tool
    out = q8.with_name(q8.name.replace("Q8_0", "Q4_0"))
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        run_child([tool("llama-quantize"), "--allow-requantize", q8, tmp, "Q4_0", "2"], "llama-quantize")
        tmp.replace(out)
    return out


def plot(res: dict, run) -> Path:
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    quants = sorted({r["quant"] for r in res["rows"]})
    for ax, test in zip(axes, ("pp", "tg")):
        rows = [r for r in res["rows"] if r["test"] == test]
        for j, rp in enumerate((1, 0)):
            ys = [next(r["avg_ts"] for r in rows if r["quant"] == q and r["repack"] == rp) for q in quants]
            ax.bar([i + 0.4 * j for i in range(len(quants))], ys, width=0.4,
                   label="shipped (repack on, no AMX)" if rp else "--repack 0")
        ax.set_xticks([i + 0.2 for i in range(len(quants))], quants)
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{'prefill' if test == 'pp' else 'decode'} ({res['n_' + ('prompt' if test == 'pp' else 'gen')]} tokens)",
                     fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    m = res["machine"]
    fig.suptitle(f"CPU paths: {m['cpu']} [{m['cpu_class']}], {res['threads']} threads", fontsize=8)
    return run.plot(fig)


def main() -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--work", default=str(C.WORK))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-prompt", type=int, default=256)
    ap.add_argument("--n-gen", type=int, default=32)
    args = ap.parse_args()
    if args.quick:
        args.layers, args.reps, args.n_prompt, args.n_gen = 2, 1, 32, 8
    run = C.Run(args, "cpu-paths")
    from bench.models import olmoe_shaped
    from lexi_gguf.runtime.cpu import amx_matmul_compiled
    from lexi_gguf.runtime.procs import run_child
    from lexi_gguf.runtime.llama import tool

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    q8 = olmoe_shaped(work, args.layers)
    models = {"Q8_0": q8, "Q4_0": q4_0_model(q8)}
    rows = []
    print("| quant | test | repack | t/s | vs --repack 0 |")
    print("|---|---|---|---|---|")
    for quant, path in models.items():
        r = run_child([tool("llama-bench"), "-m", path, "-p", args.n_prompt, "-n", args.n_gen, "-t", args.threads,
                       "-r", args.reps, "--repack", "0,1", "-o", "json"], f"llama-bench {quant}")
        for row in json.loads(r.stdout):
            test = "pp" if row["n_prompt"] else "tg"
            rows.append({"quant": quant, "test": test, "repack": int(row.get("repack", row.get("use_extra_bufts", 1))),
                         "avg_ts": row["avg_ts"], "stddev_ts": row["stddev_ts"]})
        for test in ("pp", "tg"):
            off = next(x for x in rows if x["quant"] == quant and x["test"] == test and x["repack"] == 0)
            on = next(x for x in rows if x["quant"] == quant and x["test"] == test and x["repack"] == 1)
            for x in (on, off):
                print(f"| {quant} | {test}{args.n_prompt if test == 'pp' else args.n_gen} | {x['repack']} | "
                      f"{x['avg_ts']:.1f} ± {x['stddev_ts']:.1f} | {x['avg_ts'] / off['avg_ts']:.2f}x |", flush=True)
    res = {"model": f"synthetic OLMoE-shaped: hidden 2048, 64 experts, expert ffn 1024, {args.layers} layers, base k 8",
           "threads": args.threads, "n_prompt": args.n_prompt, "n_gen": args.n_gen, "reps": args.reps,
           "amx_matmul_compiled": amx_matmul_compiled(), "rows": rows}
    run.save(res)
    plot({**res, "machine": C.machine()}, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
