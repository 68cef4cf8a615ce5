#!/usr/bin/env python3
"""Per-layer vs per-token expert counts at equal measured compute (issue 32 item 3): uniform k, LExI
data-free, LExI calibrated (`--calib-metric kld`, 1k tokens of training text), ik_llama.cpp's SER
(Kmin, t), top-p over the router's softmax, and LExI's per-layer budget with a per-token threshold inside
it (SER or top-p), on the trained built-in models (f32 GGUFs, so only the routing differs).

Mean KLD from the full model, perplexity and same-top-1 on held-out text (`eval`'s scoring: chunks of
--ctx tokens, each chunk's second half scored); the average number of experts a token ran per MoE layer
is counted in the routing hook for the per-token rules (runtime.pertoken: dropped experts get weight 0,
the kept ones renormalised where the model does). Families are compared on their Pareto frontiers at
0.75 / 0.625 / 0.5 of the base k (a frontier point there, else interpolated between its neighbours).

Target (issue 32): at equal average active experts LExI (data-free or calibrated) or LExI + threshold
beats SER and top-p on every testbed. Results: bench/results/pertoken-<machine id>.json and .png.
--quick: the default model only, 2 chunks of 128 tokens, a few rules (~15 s here). --models a,b --merge: run
those models and keep the others of this machine's last results file (each model says when it ran).
Cost here (Intel Xeon AVX512, 2 shared cores): ~4 min CPU for the default model, once its f32 file exists.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python bench/bench_pertoken.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as C  # noqa: E402

BUDGETS = [0.875, 0.75, 0.625, 0.5, 0.375]
TARGETS = [0.75, 0.625, 0.5]                  # of the base k
SER_GRID = [(1, 0.1), (1, 0.3), (1, 0.5), (1, 0.7), (2, 0.1), (2, 0.3), (2, 0.5), (2, 0.7)]
TOP_P = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
COMBO_BUDGETS = [0.875, 0.75, 0.625]
PER_TOKEN = "SER", "top-p"


def combos():
    from lexi_gguf.runtime.pertoken import ser, top_p
    return [ser(1, 0.3), ser(2, 0.5), top_p(0.6), top_p(0.8)]


def run_model(name: str, args, work: Path, train_text: str) -> dict:
    from lexi_gguf.export.convert import convert
    from lexi_gguf.gguf.reader import model_info, sensitivity_from_gguf
    from lexi_gguf.measure.tokenquality import Scorer, equal_compute
    from lexi_gguf.method.allocate import allocate
    from lexi_gguf.method.calib import kld_table
    from lexi_gguf.runtime.pertoken import ser, top_p
    from lexi_gguf.testbeds.builtin import ensure_default_model, recipe_hash
    t0 = time.perf_counter()
    model_dir = ensure_default_model(name=name)
    path = work / f"{name}-{recipe_hash(name)}-F32.gguf"       # bench_calib's file, when it made one
    if not path.exists():
        convert(model_dir, path, budget=0.75, budgets=[1.0, 0.75, 0.5], quant="F32", threads=args.threads, samples=8192)
    info = model_info(path)
    kb = info.expert_used_count
    sens = {"LExI data-free": sensitivity_from_gguf(info)}
    if not args.quick:
        sens["LExI calibrated"] = kld_table(path, train_text[: 1024 * 16], max_tokens=1024, threads=args.threads,
                                            progress=False)
    sc = Scorer(path, (model_dir / "eval.txt").read_text(), ctx=args.ctx, chunks=args.chunks, threads=args.threads)
    fam: dict[str, list[dict]] = {}

    def add(family: str, r: dict, **extra) -> None:
        r.update(extra)
        fam.setdefault(family, []).append(r)
        print(f"  {name:<14} {family:<16} {r.get('label', ''):<22} active {r['active']:.3f}  KLD {r['kld_mean']:.5f}  "
              f"PPL {r['ppl']:.3f}  top-1 {r['same_top1']:.3f}  ({r['seconds']:.1f} s)", flush=True)

    full = sc.score()
    full["label"] = "full"
    for k in range(1, kb):
        add("uniform", sc.score(sc.per_block(k)), label=f"k {k}")
    plans = {}
    for label, s in sens.items():
        for b in BUDGETS:
            plans[(label, b)] = allocate(s, budget=b)["expert_used_count"]
            add(label, sc.score(plans[(label, b)]), label=f"budget {b:g}", budget=b)
    grid_ser = SER_GRID if not args.quick else [(1, 0.3), (2, 0.5)]
    for km, t in grid_ser:
        if km < kb:
            add("SER", sc.score(None, ser(km, t)), label=f"Kmin {km}, t {t:g}")
    for p in TOP_P if not args.quick else [0.4, 0.6]:
        add("top-p", sc.score(None, top_p(p)), label=f"p {p:g}")
    inner = "LExI calibrated" if "LExI calibrated" in sens else "LExI data-free"
    for b in COMBO_BUDGETS if not args.quick else [0.75]:
        for rule in combos():
            family = "LExI + SER" if rule.kind == "ser" else "LExI + top-p"
            add(family, sc.score(plans[(inner, b)], rule), label=f"{b:g} + {rule.label}", budget=b)
    sc.close()
    for pts in fam.values():           # the full model is a point of every family (t 0, p 1, budget 1)
        pts.append(dict(full))
    targets = [round(f * kb, 4) for f in TARGETS]
    eq = equal_compute(fam, targets)
    return {"model": name, "arch": info.arch, "k_base": kb, "n_expert": info.expert_count,
            "moe_layers": len(info.moe_layers), "normalised": sc.normalised, "combo_inner": inner,
            "full_ppl": sc.full_ppl, "families": fam, "equal_compute": eq, "seconds": round(time.perf_counter() - t0, 1)}


def table(models: list[dict]) -> str:
    names = ["uniform", "LExI data-free", "LExI calibrated", "SER", "top-p", "LExI + SER", "LExI + top-p"]
    lines = ["| model | active experts | " + " | ".join(names) + " | best |", "|---|---|" + "---|" * (len(names) + 1)]
    for m in models:
        for row in m["equal_compute"]:
            cells = [f"{row['families'][n]['kld_mean']:.4f}" if n in row["families"] else "-" for n in names]
            lines.append(f"| {m['model']} | {row['active']:g} of {m['k_base']} | " + " | ".join(cells) + f" | {row['best']} |")
    return "\n".join(lines)


def verdicts(models: list[dict]) -> dict:
    """Per model and target: LExI (any form) vs the best per-token rule, as a ratio of KLDs (< 1: LExI wins)."""
    out = {}
    for m in models:
        for row in m["equal_compute"]:
            f = row["families"]
            lexi = [f[n]["kld_mean"] for n in f if n.startswith("LExI")]
            tok = [f[n]["kld_mean"] for n in PER_TOKEN if n in f]
            if lexi and tok:
                out[f"{m['model']}@{row['active']:g}"] = min(lexi) / max(min(tok), 1e-12)
    return out


def main() -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--work", default=str(C.WORK))
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=8, help="evaluation chunks of --ctx tokens")
    ap.add_argument("--models", default="default,caching,qwen3-testbed,olmoe-testbed")
    ap.add_argument("--merge", action="store_true", help="keep the other models of this machine's last results "
                    "file (each model records the date and commit it ran on)")
    args = ap.parse_args()
    if args.quick:
        args.models, args.ctx, args.chunks = "default", 128, 2
    run = C.Run(args, "pertoken")
    from lexi_gguf.measure.tokenquality import pareto_plot
    from lexi_gguf.testbeds.builtin import corpus
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train_text, _ = corpus()
    models = []
    for n in args.models.split(","):
        m = run_model(n, args, work, train_text)
        prov = C.provenance()
        m.update(date=prov["date"], commit=prov["commit"], dirty=prov["dirty"])
        models.append(m)
    if args.merge and run.json.exists():
        import json
        now = {m["model"] for m in models}
        kept = [m for m in json.loads(run.json.read_text())["models"] if m["model"] not in now]
        models = kept + models
        print(f"kept from {run.json.name}: {', '.join(m['model'] for m in kept) or 'none'}")
    print(table(models))
    ratio = verdicts(models)
    res = {"ctx": args.ctx, "chunks": args.chunks, "budgets": BUDGETS, "targets_of_base_k": TARGETS,
           "ser_grid": SER_GRID, "top_p": TOP_P, "combo_budgets": COMBO_BUDGETS,
           "lexi_over_best_per_token": ratio, "models": models, "table": table(models),
           "targets_met": {"LExI or LExI + threshold beats SER and top-p at equal active experts on every testbed":
                           bool(ratio) and all(v < 1 for v in ratio.values())}}
    run.save(res)
    pareto_plot(models, run.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
