"""Report renderers of the quality and caching studies (seeds, weight norm, calibration, expert
caching, id predictors) and of the mutation campaign."""
from __future__ import annotations

import json
from pathlib import Path

from .markdown import cell, family, generic, num, table, targets


@family("seeds", "How the headline moves with the training seed", "bench/bench_seeds.py", "docs/method.md",
        "the default recipe trained with several seeds, converted and evaluated as `make demo` does")
def _seeds(d: dict) -> list[str]:
    rows = []
    for s in d["per_seed"]:
        for b in d.get("budgets", []):
            v = s.get(f"{b:g}") or {}
            rows.append([s["seed"], s.get("recipe_hash"), f"{b:g}", num(v.get("kld_uniform"), ".4f"),
                         num(v.get("kld_lexi"), ".4f"), num(v.get("ratio")), v.get("counts_lexi"),
                         num(v.get("ppl_full"), ".3f")])
    spread = [[b, num(v.get("mean")), num(v.get("min")), num(v.get("max")), num(v.get("stdev"))]
              for b, v in (d.get("ratio_over_seeds") or {}).items()]
    return [f"ctx {d.get('ctx', '?')}, held-out text; KLD: mean KL divergence from the full model.",
            table(["seed", "recipe", "budget", "KLD uniform", "KLD LExI", "LExI / uniform", "LExI k per layer",
                   "PPL full"], rows),
            "LExI / uniform KLD over the seeds:",
            table(["budget", "mean", "min", "max", "stdev"], spread)]


@family("weight-norm", "Weighting fewer experts: renorm or base", "bench/bench_weight_norm.py", "docs/gguf-contract.md",
        "each mode with its own profile and allocation, mean KLD from the full model on held-out text")
def _weight_norm(d: dict) -> list[str]:
    rows = []
    for m in d["models"]:
        name = f"{m['model']} ({m.get('arch', '?')}, {'normalises' if m.get('normalises_top_k') else 'does not normalise'})"
        for r in m["rows"]:
            rows.append([name, r["config"], num(r["budget"], "g"), num(r.get("avg_k_renorm")), num(r["kld_renorm"], ".4f"),
                         num(r["kld_base"], ".4f"), num(r.get("change"), "+.0%"), num(r.get("ppl_renorm"), ".2f"),
                         num(r.get("ppl_base"), ".2f")])
    return [f"ctx {d.get('ctx', '?')}, Q8_0.",
            table(["model (router)", "config", "budget", "avg k", "KLD renorm", "KLD base", "change", "PPL renorm",
                   "PPL base"], rows), *targets(d)]


@family("calib", "Calibrated profiling", "bench/bench_calib.py", "docs/method.md",
        "data-free vs the `deviation` and `kld` metrics on the models' own text vs a greedy oracle that sees the "
        "evaluation text; mean KLD from the full model")
def _calib(d: dict) -> list[str]:
    labels = ["data-free", *(f"deviation {t}" for t in d.get("deviation_tokens", [])),
              *(f"kld {t}" for t in d.get("kld_tokens", [])), "greedy"]

    def short(lab):
        a, _, t = lab.partition(" ")
        return f"{a} {int(t) // 1024}k" if t.isdigit() and int(t) % 1024 == 0 else lab
    rows, counts = [], []
    for m in d["models"]:
        for r in m["rows"]:
            rows.append([m["model"], num(r["budget"], "g"),
                         *(num((r.get(lab) or {}).get("kld"), ".4f") for lab in labels),
                         num(r.get("kld_calib_over_greedy")) + "x"])
            counts.append([m["model"], num(r["budget"], "g"), *((r.get(lab) or {}).get("counts") for lab in labels)])
    head = ["model", "budget", *(short(x) if x != "greedy" else "greedy (oracle)" for x in labels)]
    return [f"ctx {d.get('ctx', '?')}, {d.get('chunks', '?')} chunks of held-out text; f32 files, so only the "
            "allocation differs" + (f"; the oracle's counts reused from `{d['greedy_counts_from']}`"
                                    if d.get("greedy_counts_from") else "") + ".",
            table([*head, "kld 1k / oracle"], rows), "k per layer of each allocation:", table(head, counts),
            *targets(d)]


@family("caching", "Expert caching on the trained caching testbed", "bench/bench_caching.py", "docs/caching.md",
        "traces at full k, LExI and uniform k, replayed through demand caches and look-ahead prefetch, free and "
        "on a clock")
def _caching(d: dict) -> list[str]:
    confs = d["configs"]
    out = [f"Model `{Path(str(d.get('model', ''))).name}`, {d.get('prompts', '?')} held-out prompts + "
           f"{d.get('max_new_tokens', '?')} sampled tokens each (temperature {d.get('temperature', '?')}), "
           f"prefetch depth {d.get('depth', '?')}."]
    clock = [r for c in confs for r in c.get("clock", [])]
    if clock:
        link = clock[0].get("link", "?")
        cap = clock[0].get("capacity")
        pols = list(dict.fromkeys(r["policy"] for r in clock if r.get("slots", "global") == "global"))
        quota = list(dict.fromkeys(r["policy"] for r in clock if r.get("slots") == "k"))

        def ms(c, pol, slots="global"):
            r = next((x for x in c.get("clock", []) if x["policy"] == pol and x.get("slots", "global") == slots), None)
            return f"{num(r['ms_per_token'])} ({num(r['mb_per_token'])})" if r else "-"
        out.append(f"On the clock ({link}, capacity {num(cap, 'g')}): ms per token (MB moved per token):")
        out.append(table(["config", "avg k", *pols, *(f"{p}, per-layer quotas ~ k" for p in quota)],
                         [[c["config"], num(c.get("avg_k")), *(ms(c, p) for p in pols), *(ms(c, p, "k") for p in quota)]
                          for c in confs]))
    caps = sorted({r["capacity"] for c in confs for r in c.get("cache", [])})
    if caps:
        cap = 0.1 if 0.1 in caps else caps[0]
        pols = list(dict.fromkeys(r["policy"] for c in confs for r in c.get("cache", [])))

        def hit(c, pol):
            r = next((x for x in c.get("cache", []) if x["policy"] == pol and x["capacity"] == cap), None)
            return num(r["hit_rate"], ".3f") if r else "-"
        out.append(f"Free-transfer model (an upper bound: a prefetch is resident when issued), hit rate at capacity "
                   f"{num(cap, 'g')}:")
        out.append(table(["config", "avg k", *pols], [[c["config"], num(c.get("avg_k")), *(hit(c, p) for p in pols)]
                                                      for c in confs]))
    preds = list(dict.fromkeys(p for c in confs for p in c.get("predictors", {})))
    if preds:
        out.append("Predictors on decode tokens, recall@k:")
        out.append(table(["config", *preds], [[c["config"], *(num((c.get("predictors", {}).get(p) or {}).get("recall"), ".3f")
                                                                for p in preds)] for c in confs]))
    tc, sp = d.get("trace_cost"), d.get("simulator_speed")
    if tc:
        out.append(f"Tracing costs {num(tc.get('ratio'))}x a plain eval ({num(tc.get('trace_seconds'))} vs "
                   f"{num(tc.get('plain_seconds'))} s on {tc.get('tokens')} tokens).")
    if sp:
        out.append(f"The simulator replays {num(sp.get('events', 0) / 1e6, '.2f')} M requests in "
                   f"{num(sp.get('lru_seconds'), '.1f')} s (LRU) / {num(sp.get('belady_seconds'), '.1f')} s (Belady).")
    return out + targets(d)


@family("idpredict", "Expert-id predictors and the clocked cache", "bench/bench_idpredict.py", "docs/caching.md",
        "previous token, co-activation, the MoE-Beyond-style sequence transformer and the router look-ahead; "
        "the clocked simulator on disks of two speeds")
def _idpredict(d: dict) -> list[str]:
    rec = d["recall"]
    dists = sorted({k for v in rec.values() for k in v}, key=lambda x: int(x))
    out = [f"Testbed `{d.get('testbed', '?')}`, {d.get('tokens', '?')} traced tokens ({d.get('decode_tokens', '?')} "
           f"decode), predictors trained on {d.get('train_tokens', '?')} tokens of other prompts; compute "
           f"{num((d.get('compute_s_per_layer') or 0) * 1e3, '.3f')} ms per MoE layer (measured while tracing).",
           table(["predictor", *(f"recall@k d={k}" for k in dists)],
                 [[p, *(num(v.get(k), ".3f") for k in dists)] for p, v in rec.items()])]
    rows = d.get("clock", [])
    links = list(dict.fromkeys(r["link"] for r in rows))
    pols = list(dict.fromkeys(r["policy"] for r in rows))

    def at(pol, link):
        r = next((x for x in rows if x["policy"] == pol and x["link"] == link), None)
        return f"{num(r['ms_per_token'])} ({num(r['mb_per_token'])})" if r else "-"
    if rows:
        out.append(f"Clocked, capacity {num(rows[0].get('capacity'), 'g')}: ms per token (MB moved per token):")
        out.append(table(["policy", *links], [[p, *(at(p, lk) for lk in links)] for p in pols]))
    tr = d.get("tradeoff") or {}
    if tr:
        out.append(table(["link", "pick", "policy", "vs LRU time", "vs Belady bytes"],
                         [[lk, what, v.get("policy"), num(v.get("vs_lru_time")) + "x", num(v.get("vs_belady_bytes")) + "x"]
                          for lk, picks in tr.items() for what, v in picks.items()]))
    return out + targets(d)


@family("policies", "Cache policies for transfer >> compute and compute ~ transfer", "bench/bench_policies.py",
        "docs/caching.md", "LRU, LFU, EAMC, Belady, learned next-use eviction, prefetch of every guess and gated "
        "prefetch, clocked, at full k and 0.75 of the k, on the trained testbed and on synthetic routing")
def _policies(d: dict) -> list[str]:
    out = [f"Clocked on {d.get('link', '?')}, look-ahead depth {d.get('depth', '?')}; speed against LRU at full k "
           "(ms per token in brackets). Belady, the oracle's gated prefetch and nextuse told each request's expert "
           "frequencies in advance are bounds, not policies one can run."]
    for c in d["cases"]:
        rows = c["rows"]
        pols = list(dict.fromkeys(r["policy"] for r in rows))

        def at(pol, k):
            r = next((x for x in rows if x["policy"] == pol and x["k"] == k), None)
            return f"{num(r['vs_full_lru'])}x ({num(r['ms_per_token'], '.1f')})" if r else "-"
        out.append(f"**{c['case']}, {c['regime']}**: experts {num(c['expert_bytes'] / 1e6, '.2f')} MB, compute "
                   f"{num(c['compute_s_per_layer'] * 1e3, 'g')} ms a layer, capacity {num(c['capacity'], 'g')}, "
                   f"{c.get('decode_tokens', '?')} decode tokens; 0.75: {c.get('counts_0.75_label', '?')} "
                   f"{c.get('counts_0.75')}.")
        def field(pol, f, fmt):
            r = next((x for x in rows if x["policy"] == pol and x["k"] == "full"), None)
            return num(r[f], fmt) if r else "-"
        out.append(table(["policy", "full k", "0.75 of k", "hit (full)", "late (full)", "MB/token (full)"],
                         [[p, at(p, "full"), at(p, "0.75"), field(p, "hit_rate", ".3f"), field(p, "late_rate", ".3f"),
                           field(p, "mb_per_token", ".1f")] for p in pols]))
        out.append(f"Best realizable at full k: {c['best']} {num(c['best_vs_lru'])}x LRU (Belady {num(c['belady_vs_lru'])}x, "
                   f"frequency oracle {num(c.get('frequency_oracle_vs_lru'))}x); "
                   f"at 0.75: {c['best_0.75']} {num(c['best_0.75_vs_full_lru'])}x full-k LRU.")
    return out + targets(d)


@family("mutation", "Mutation campaign", "bench/bench_mutations.py", "docs/gguf-contract.md",
        "damaged GGUF files fed to every command: what each command did with each kind of damage")
def _mutation(d: dict) -> list[str]:
    out = [f"{d.get('cases', '?')} cases, {d.get('runs', '?')} runs over {len(d.get('commands') or [])} commands"
           + (f": {', '.join(f'`{c}`' for c in d['commands'])}" if d.get("commands") else "") + "."]
    for key, what in (("by_command", "command"), ("by_mutation", "mutation")):
        t = d.get(key)
        if isinstance(t, dict) and t:
            outcomes = list(dict.fromkeys(o for v in t.values() if isinstance(v, dict) for o in v))
            rows = [[f"`{name}`", *((v or {}).get(o, 0) for o in outcomes),
                     sum(x for x in (v or {}).values() if isinstance(x, (int, float)))] for name, v in t.items()]
            out.append(f"Outcomes by {what}:")
            out.append(table([what, *outcomes, "total"], rows))
    fails = d.get("failures") or []
    if fails:
        out.append(f"Failures ({len(fails)}{', first 20' if len(fails) > 20 else ''}):")
        out.append("\n".join(f"- {cell(json.dumps(f, sort_keys=True) if not isinstance(f, str) else f)}"
                             for f in fails[:20]))
    else:
        out.append("No failures.")
    rest = {k: v for k, v in d.items() if k not in ("cases", "runs", "commands", "by_command", "by_mutation", "failures")}
    return out + generic(rest)


# the order of the report; families without a renderer follow, by name
