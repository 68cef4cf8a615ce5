#!/usr/bin/env python3
"""Weighting fewer experts (issue 13): renorm (divide the survivors by their own sum, today) vs base
(divide by the trained top-k mass), each with its own profile and allocation, on the trained built-in
models: the default and caching models (Mixtral) and the Qwen3-MoE testbed normalise top-k; the OLMoE
testbed does not (there `base` must change nothing). Mean KL divergence from the full model on their
held-out text, LExI and uniform at budgets 0.75 and 0.5.

Target (issue 13): base cuts LExI's mean KLD by >= 15 % at budget 0.5 on every normalising testbed.
Results: bench/results/weight-norm-<machine id>.json. --quick: the default and OLMoE testbed models, ctx 128.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python bench/bench_weight_norm.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as C  # noqa: E402


def main() -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--work", default=str(C.WORK))
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--models", default="default,caching,qwen3-testbed,olmoe-testbed")
    args = ap.parse_args()
    if args.quick:
        args.models, args.ctx = "default,olmoe-testbed", 128
    run = C.Run(args, "weight-norm")
    from lexi_gguf.method.archs import spec_for
    from lexi_gguf.export.convert import convert
    from lexi_gguf.testbeds.builtin import ensure_default_model, recipe_hash
    from lexi_gguf.method.weights import load_config
    from lexi_gguf.measure.evaluate import evaluate

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    budgets = [0.75, 0.5]
    res = {"ctx": args.ctx, "budgets": budgets, "models": []}
    lines = ["| model | config | budget | avg k | KLD renorm | KLD base | change |", "|---|---|---|---|---|---|---|"]
    for name in args.models.split(","):
        model_dir = ensure_default_model(name=name)
        cfg = load_config(model_dir)
        normalises = spec_for(cfg["model_type"]).routing(cfg).norm_topk
        text = (model_dir / "eval.txt").read_text()
        got = {}
        for mode in ("renorm", "base"):
            out = work / f"{name}-{recipe_hash(name)}-{mode}-Q8_0.gguf"
            if not out.exists():
                convert(model_dir, out, budget=0.75, budgets=[1.0, *budgets], quant="Q8_0", threads=args.threads,
                        samples=4096, weight_norm=mode)
            got[mode] = evaluate(out, text, budgets, ctx=args.ctx, threads=args.threads, progress=False)
        rows = []
        for r, b in zip(got["renorm"]["rows"], got["base"]["rows"]):
            if r["config"] == "full":
                continue
            change = b["kld_mean"] / r["kld_mean"] - 1
            rows.append({"config": r["config"], "budget": r["budget"], "avg_k_renorm": r["avg_k"], "avg_k_base": b["avg_k"],
                         "counts_renorm": r["expert_used_count"], "counts_base": b["expert_used_count"],
                         "kld_renorm": r["kld_mean"], "kld_base": b["kld_mean"], "change": change,
                         "ppl_renorm": r["ppl"], "ppl_base": b["ppl"]})
            lines.append(f"| {name} | {r['config']} | {r['budget']:g} | {r['avg_k']:.2f} | {r['kld_mean']:.4f} | "
                         f"{b['kld_mean']:.4f} | {change:+.0%} |")
        res["models"].append({"model": name, "arch": cfg["model_type"], "normalises_top_k": normalises, "rows": rows})
    print("\n".join(lines))
    lexi05 = [r for m in res["models"] if m["normalises_top_k"] for r in m["rows"]
              if r["config"] == "lexi" and r["budget"] == 0.5]
    same = [r for m in res["models"] if not m["normalises_top_k"] for r in m["rows"]]
    res["targets_met"] = {
        "base cuts LExI KLD >= 15 % at 0.5 on every normalising testbed": all(r["change"] <= -0.15 for r in lexi05),
        "base leaves a non-normalising testbed unchanged": all(r["kld_base"] == r["kld_renorm"] for r in same)}
    run.save(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
