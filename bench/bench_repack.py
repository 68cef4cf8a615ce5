#!/usr/bin/env python3
"""What not repacking costs when the model fits (issue 19): prefill and decode tok/s of a quantized
bench model with ggml's CPU repack on (llama.cpp's default) and off (`--repack off`, llama.cpp's
--no-repack: weights read in place from the mapped file, which is what lets them page), same
process, same tokens, alternating, at full k and LExI 0.75; plus the anonymous memory each holds.

The model is bench_memlimit.py's synthetic OLMoE-shaped file requantized (default Q4_K_M, 16 layers x
64 experts, hidden 1024, expert ffn 512). Results: bench/results/repack-<quant>-<machine id>.json + .png.
--quick: 4 layers, hidden 256, expert ffn 128, 32/8 tokens, one repetition.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python bench/bench_repack.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as C  # noqa: E402

CHILD = r"""
import json, sys
from pathlib import Path
from lexi_gguf.measure.bench import measure
from lexi_gguf.runtime.llama import load
a = json.loads(sys.argv[1])

def anon_mib():
    status = Path("/proc/self/status").read_text()
    return next(int(x.split()[1]) for x in status.splitlines() if x.startswith("RssAnon:")) / 1024
before = anon_mib()
llm = load(a["model"], kv_overrides=a["kv"], n_ctx=256, n_threads=a["threads"], repack=a["repack"])
llm.eval([100, 200, 300])
held = anon_mib() - before            # what the loaded model holds in anonymous memory
llm.close()
r = measure(a["model"], a["kv"], n_prompt=a["n_prompt"], n_gen=a["n_gen"], reps=a["reps"], threads=a["threads"],
            repack=a["repack"])
r["rss_anon_mib"] = held
print("RESULT " + json.dumps(r))
"""


def main() -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--n-prompt", type=int, default=128)
    ap.add_argument("--n-gen", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.quick:
        args.layers, args.hidden, args.ffn, args.n_prompt, args.n_gen, args.reps = 4, 256, 128, 32, 8, 1
    run = C.Run(args, "repack", args.quant)
    from bench.models import CACHE, big_olmoe
    from lexi_gguf.export.convert import quantize
    from lexi_gguf.measure.configs import run_configs

    q8 = big_olmoe(CACHE, hidden=args.hidden, ffn=args.ffn, layers=args.layers, experts=64)
    model = q8.with_name(q8.stem.replace("Q8_0", args.quant) + ".gguf")
    if not model.exists():
        tmp = model.with_suffix(".tmp")
        quantize(q8, tmp, args.quant, threads=args.threads, allow_requantize=True)
        tmp.rename(model)
    configs = [c for c in run_configs(model, [0.75]) if c.label in ("full", "lexi 0.75")]
    rows = []
    for c in configs:
        for repack in ("on", "off"):
            spec = {"model": str(model), "kv": c.kv, "n_prompt": args.n_prompt, "n_gen": args.n_gen, "reps": args.reps,
                    "threads": args.threads, "repack": repack}
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                                 check=True, cwd=C.ROOT).stdout
            r = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
            rows.append({"config": c.label, "repack": repack, **r})
            print(f"  {c.label:<10} repack {repack:<3}: pp {r['pp_tps']:.1f} tok/s, tg {r['tg_tps']:.2f} tok/s, "
                  f"RssAnon {r['rss_anon_mib']:.0f} MiB", flush=True)
    print("\n| config | repack | prefill tok/s | decode tok/s | RssAnon held MiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['repack']} | {r['pp_tps']:.1f} ({r['pp_min']:.1f}-{r['pp_max']:.1f}) | "
              f"{r['tg_tps']:.2f} ({r['tg_min']:.2f}-{r['tg_max']:.2f}) | {r['rss_anon_mib']:.0f} |")
    for c in configs:
        on, off = (next(r for r in rows if r["config"] == c.label and r["repack"] == m) for m in ("on", "off"))
        print(f"{c.label}: repack off / on = prefill {off['pp_tps'] / on['pp_tps']:.2f}x, decode "
              f"{off['tg_tps'] / on['tg_tps']:.2f}x")
    res = {"model": str(model), "model_bytes": model.stat().st_size, "quant": args.quant,
           "n_prompt": args.n_prompt, "n_gen": args.n_gen, "reps": args.reps, "threads": args.threads, "rows": rows}
    run.save(res)
    plt = C.pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    labels = [f"{r['config']}\nrepack {r['repack']}" for r in rows]
    ax[0].bar(labels, [r["pp_tps"] for r in rows])
    ax[1].bar(labels, [r["tg_tps"] for r in rows])
    ax[0].set_ylabel("prefill tok/s")
    ax[1].set_ylabel("decode tok/s")
    for a in ax:
        a.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{args.quant} bench model ({model.stat().st_size / 2**30:.2f} GiB), {C.machine()['cpu_class']}", fontsize=9)
    run.plot(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
