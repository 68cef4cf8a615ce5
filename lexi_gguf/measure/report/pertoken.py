"""Report renderer of bench/bench_pertoken.py: per-layer (uniform, LExI) vs per-token (SER, top-p) expert
counts and both together, at equal measured active experts: KLD, PPL and same-top-1 at each target, the
winner, and every measured point."""
from __future__ import annotations

from .markdown import family, num, table, targets

NAMES = ["uniform", "LExI data-free", "LExI calibrated", "SER", "top-p", "LExI + SER", "LExI + top-p"]


def _cell(row: dict, name: str, key: str, fmt: str) -> str:
    got = row["families"].get(name)
    s = num(got.get(key), fmt) if got else "-"
    return f"**{s}**" if got and name == row.get("best") and key == "kld_mean" else s


@family("pertoken", "Per-layer vs per-token expert counts at equal compute", "bench/bench_pertoken.py",
        "docs/pertoken.md", "uniform k, LExI (data-free and calibrated), ik_llama.cpp's SER (Kmin, t), top-p and "
        "LExI + a per-token threshold inside its per-layer counts, on the trained built-in models at equal "
        "average active experts (counted per token and MoE layer in the routing hook); mean KLD from the full "
        "model, PPL and same-top-1 on held-out text")
def _pertoken(d: dict) -> list[str]:
    models = d["models"]
    out = [f"ctx {d.get('ctx', '?')}, {d.get('chunks', '?')} chunks of each model's held-out text; f32 files. Each "
           "family is read on its Pareto frontier at the given active experts (a measured point there, else "
           "linear between its neighbours; `-`: the family does not reach both sides); the full model is a point "
           "of every family. Per-token rules drop experts by weight 0 (kept ones renormalised where the model "
           "normalises): quality only, the dropped experts still ran. Mean KLD (lowest in bold):"]
    rows = []
    for m in models:
        for r in m["equal_compute"]:
            rows.append([m["model"], f"{num(r['active'], 'g')} of {m['k_base']}",
                         *(_cell(r, n, "kld_mean", ".4f") for n in NAMES), r.get("best") or "-"])
    out.append(table(["model", "active experts", *NAMES, "best"], rows))
    out.append("PPL / same top-1 at the same points (full model's PPL beside the name):")
    rows = []
    for m in models:
        for r in m["equal_compute"]:
            rows.append([f"{m['model']} ({num(m.get('full_ppl'), '.1f')})", f"{num(r['active'], 'g')} of {m['k_base']}",
                         *(f"{_cell(r, n, 'ppl', '.1f')} / {_cell(r, n, 'same_top1', '.3f')}"
                           if n in r["families"] else "-" for n in NAMES)])
    out.append(table(["model", "active experts", *NAMES], rows))
    ratio = d.get("lexi_over_best_per_token") or {}
    if ratio:
        out.append("Best LExI form over the best per-token rule (KLD ratio; < 1: LExI better): " +
                   ", ".join(f"{k} {num(v)}x" for k, v in ratio.items()) + ".")
    for m in models:
        pts = [[fam, p.get("label", ""), num(p["active"], ".3f"), num(p["kld_mean"], ".5f"), num(p["ppl"], ".2f"),
                num(p["same_top1"], ".3f")]
               for fam, ps in m["families"].items() for p in ps if p.get("label") != "full"]
        out.append(f"<details><summary>{m['model']} ({m['arch']}, {m['moe_layers']} MoE layers, {m['n_expert']} "
                   f"experts, base k {m['k_base']}, {'normalises' if m.get('normalised') else 'does not normalise'} "
                   f"its top-k weights; LExI + threshold inside {m.get('combo_inner', '?')}"
                   + (f"; ran {m['date'][:10]} at `{m['commit']}`" if m.get("commit") else "") + "): every measured point"
                   "</summary>\n\n" + table(["family", "setting", "active", "KLD", "PPL", "same top-1"], pts) +
                   "\n\n</details>")
    return out + targets(d)
