#!/usr/bin/env python3
"""How much the demo's headline moves with the training seed: the default recipe trained with several
seeds (1234 is the demo's own model), each converted as `make demo` converts it (Q8_0, budget 0.75,
ladder 1 / 0.75 / 0.5) and evaluated as the demo evaluates it (held-out text, ctx 256). Reported per
seed and over seeds: mean KL divergence from the full model for uniform k and LExI at equal budget,
and the ratio LExI / uniform that the demo's summary prints.

The models are reproducible (lexi_gguf.testbeds.builtin), so the spread here is the seed's, not the
machine's. Each seed trains for minutes on 2 cores (cached afterwards by recipe hash).
Results: bench/results/seeds-<machine id>.json and .png. --quick: seeds 1234 and 1 (trained once, then
cached), ctx 128.

    .venv/bin/python bench/bench_seeds.py [--seeds 1234,1,2]
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python bench/bench_seeds.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as C  # noqa: E402
BUDGETS = [0.75, 0.5]


def main() -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--seeds", default="1234,1,2", help="training seeds (1234: the demo's model)")
    ap.add_argument("--work", default=str(C.WORK))
    ap.add_argument("--ctx", type=int, default=256)
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.ctx = "1234,1", 128
    run = C.Run(args, "seeds")
    from lexi_gguf.export.convert import convert
    from lexi_gguf.measure.evaluate import evaluate
    from lexi_gguf.testbeds.builtin import ensure_default_model, recipe_hash

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = []
    for seed in seeds:
        model_dir = ensure_default_model(seed=seed)
        gguf = work / f"default-{recipe_hash('default', seed)}-Q8_0.gguf"
        if not gguf.exists():
            convert(model_dir, gguf, budget=0.75, budgets=[1.0, *BUDGETS], quant="Q8_0", threads=args.threads)
        ev = evaluate(gguf, (model_dir / "eval.txt").read_text(), BUDGETS, ctx=args.ctx, threads=args.threads,
                      progress=False)
        kld = {(r["config"], r["budget"]): r for r in ev["rows"]}
        row = {"seed": seed, "recipe_hash": recipe_hash("default", seed)}
        for b in BUDGETS:
            u, x = kld[("uniform", b)], kld[("lexi", b)]
            row[f"{b:g}"] = {"kld_uniform": u["kld_mean"], "kld_lexi": x["kld_mean"], "ratio": x["kld_mean"] / u["kld_mean"],
                             "counts_lexi": x["expert_used_count"], "ppl_full": kld[("full", 1.0)]["ppl"]}
        per_seed.append(row)
        print(f"seed {seed}: " + ", ".join(f"budget {b:g} KLD uniform {row[f'{b:g}']['kld_uniform']:.4f} "
                                           f"LExI {row[f'{b:g}']['kld_lexi']:.4f} (ratio {row[f'{b:g}']['ratio']:.2f})"
                                           for b in BUDGETS), flush=True)
    spread = {}
    lines = ["| budget | LExI / uniform KLD, per seed | mean | min | max | stdev |", "|---|---|---|---|---|---|"]
    for b in BUDGETS:
        ratios = [r[f"{b:g}"]["ratio"] for r in per_seed]
        spread[f"{b:g}"] = {"mean": statistics.mean(ratios), "min": min(ratios), "max": max(ratios),
                            "stdev": statistics.stdev(ratios) if len(ratios) > 1 else 0.0}
        s = spread[f"{b:g}"]
        lines.append(f"| {b:g} | {', '.join(f'{x:.2f}' for x in ratios)} | {s['mean']:.2f} | {s['min']:.2f} | "
                     f"{s['max']:.2f} | {s['stdev']:.2f} |")
    print("\n".join(lines))
    res = {"seeds": seeds, "ctx": args.ctx, "budgets": BUDGETS, "per_seed": per_seed, "ratio_over_seeds": spread}
    run.save(res)
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for i, b in enumerate(BUDGETS):
        ys = [r[f"{b:g}"]["ratio"] for r in per_seed]
        ax.plot([i] * len(ys), ys, "o", color=f"C{i}", alpha=0.7)
        ax.errorbar([i + 0.15], [spread[f"{b:g}"]["mean"]], yerr=[[spread[f"{b:g}"]["mean"] - min(ys)],
                                                                    [max(ys) - spread[f"{b:g}"]["mean"]]],
                    fmt="s", color=f"C{i}", capsize=4)
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_xticks(range(len(BUDGETS)), [f"budget {b:g}" for b in BUDGETS])
    ax.set_ylabel("LExI KLD / uniform KLD (lower: LExI better)")
    ax.set_title(f"default recipe, {len(seeds)} training seeds ({C.machine()['cpu_class']})", fontsize=9)
    ax.grid(alpha=0.3)
    run.plot(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
