"""The caching experiment end to end (used by `make demo` and bench/bench_caching.py): on the built-in
caching testbed (64 experts, k 8, 8 layers), trace held-out prompts at full k, at LExI budgets and at
uniform k of equal budget; score the look-ahead predictors (router baseline, and a learned one trained
on a disjoint prompt set); replay every trace through the caches; one table per question and a
hit-rate-vs-capacity plot."""
from __future__ import annotations

import time
from pathlib import Path

from .. import LexiError
from . import predict, simulate
from ..runtime.trace import record

CAPACITIES = [0.05, 0.1, 0.25, 0.5]
POLICIES = ["lru", "lfu", "eamc", "belady", "router", "learned", "oracle"]


def testbed_gguf(out_dir: Path, budgets=(0.75, 0.5), threads: int = 2, log=print, name: str = "caching") -> Path:
    """A built-in testbed (default: the caching one), trained (cached) and converted (Q8_0) with a
    ladder holding `budgets`."""
    from ..export.convert import convert
    from ..testbeds.builtin import ensure_default_model, recipe_hash
    stem = "caching-testbed" if name == "caching" else name
    out = Path(out_dir) / f"{stem}-{recipe_hash(name)}-Q8_0.gguf"   # a new recipe, a new file
    if not out.exists():
        convert(ensure_default_model(log=log, name=name), out, budget=budgets[0], budgets=[1.0, *budgets],
                quant="Q8_0", threads=threads, samples=4096)
    return out


def held_out_prompts(model_dir: Path, n: int, offset: int = 0) -> list[str]:
    """Prompts from the testbed's held-out text (never trained on): n substantial lines from `offset`."""
    lines = [ln.strip() for ln in (Path(model_dir) / "eval.txt").read_text().splitlines() if len(ln.strip()) > 60]
    if len(lines) < offset + n:
        raise LexiError(f"the held-out text has {len(lines)} usable lines, {offset + n} prompts were asked for")
    return [ln[:200] for ln in lines[offset:offset + n]]


# sampled, not greedy: greedy decoding of the small testbed loops on one token, and a loop makes
# every cache look perfect
TEMPERATURE = 0.8


def run(gguf: Path, prompts: list[str], train_prompts: list[str], budgets=(0.75, 0.5), *, max_new_tokens: int = 32,
        depth: int = 2, capacities=CAPACITIES, threads: int = 2, temperature: float = TEMPERATURE, log=print) -> dict:
    """Trace `prompts` (evaluation) and `train_prompts` (disjoint: the learned predictor's training
    data) at each configuration, then score predictors and simulate caches on the evaluation traces."""
    if set(prompts) & set(train_prompts):
        raise LexiError("the predictor's training prompts must be disjoint from the evaluation prompts")
    from ..measure.configs import uniform_k
    from ..gguf.reader import model_info
    info = model_info(gguf)
    k = info.expert_used_count
    configs = [("full", {"no_lexi": True})]
    for b in budgets:
        configs += [(f"lexi {b:g}", {"budget": f"{b:g}"}), (f"uniform {b:g}", {"uniform_k": uniform_k(b, k)})]
    out = {"model": str(gguf), "prompts": len(prompts), "max_new_tokens": max_new_tokens, "depth": depth,
           "temperature": temperature, "configs": []}
    for name, kw in configs:
        t0 = time.perf_counter()
        tr = record(gguf, prompts=prompts, max_new_tokens=max_new_tokens, hidden=True, threads=threads,
                    temperature=temperature, seed=0, progress=False, **kw)
        train = record(gguf, prompts=train_prompts, max_new_tokens=max_new_tokens, hidden=True, threads=threads,
                       temperature=temperature, seed=1, progress=False, **kw)
        learner = predict.LearnedPredictor(tr.hidden.shape[-1], tr.n_expert, len(tr.moe_layers), depth)
        fit = learner.fit(train)
        learned = learner.predictions(tr)
        preds = predict.router_predictions(tr, gguf, depth=depth)
        dec = tr.generated.nonzero()[0]
        pred_rows = {f"router d={d}": predict.score(tr, preds[d], dec) for d in preds}
        pred_rows.update({f"learned d={d}": predict.score(tr, learned[d], dec) for d in learned})
        pred_rows["random"] = predict.score(tr, predict.random_predictions(tr)[1], dec)
        for r in pred_rows.values():
            r.pop("layers")
        sim = simulate.run(tr, list(capacities), POLICIES, depth=depth, predictors={
            "router": preds, "learned": learned, "oracle": simulate.oracle_predictions(tr, depth)})
        quota = simulate.run(tr, list(capacities), ["lru", "router"], depth=depth, slot_mode="k", predictors={"router": preds})
        clocked = clocked_rows(tr, {"router": preds, "learned": learned, "oracle": simulate.oracle_predictions(tr, depth)},
                               depth)
        log(f"  {name:<14} k per MoE layer {tr.counts.tolist()}: {len(tr.tokens)} tokens "
            f"({int(tr.generated.sum())} generated) traced and simulated in {time.perf_counter() - t0:.1f} s")
        out["configs"].append({"config": name, "counts": tr.counts.tolist(), "avg_k": float(tr.counts.mean()),
                               "tokens": len(tr.tokens), "generated": int(tr.generated.sum()),
                               "train_tokens": len(train.tokens), "learned_fit": fit,
                               "trace_seconds": tr.meta["seconds"], "predictors": pred_rows,
                               "cache": sim["rows"], "cache_k_quota": quota["rows"], "clock": clocked})
    return out


CLOCK = dict(link="nvme", queue_depth=32, demand_first=True, capacity=0.1)
CLOCK_POLICIES = ("lru", "belady", "router", "learned", "oracle")


def clocked_rows(tr, predictors: dict, depth: int) -> list[dict]:
    """The same trace on the clock (caching/clock.py; CLOCK: nvme preset, 32 requests in flight, demand
    first, 10 % capacity, compute measured while tracing): each policy with one shared pool, and LRU and
    router prefetch with per-layer quotas (equal, and following each layer's k)."""
    from . import clock
    comp = clock.compute_from_trace(tr)
    kw = dict(link=CLOCK["link"], compute_s=comp, depth=depth, phase="decode", queue_depth=CLOCK["queue_depth"],
              demand_first=CLOCK["demand_first"])
    rows = []
    for slots in ("global", "equal", "k"):
        for pol in CLOCK_POLICIES if slots == "global" else ("lru", "router"):
            name = pol if pol in simulate.DEMAND_POLICIES else f"prefetch:{pol}"
            r = clock.simulate_clocked(tr, CLOCK["capacity"], name, predictions=predictors.get(pol), slot_mode=slots,
                                       **kw).row()
            rows.append({**r, "slots": slots})
    return rows


def clock_table(res: dict) -> str:
    """ms per token (MB moved per token) on the clock, per configuration and policy."""
    cols = [("global", p) for p in CLOCK_POLICIES] + [("equal", "lru"), ("k", "lru"), ("equal", "router"), ("k", "router")]
    head = [p if s == "global" else f"{p}, {s} quotas" for s, p in cols]
    lines = [f"On the clock ({CLOCK['link']}, {CLOCK['queue_depth']} in flight, demand first, capacity "
             f"{CLOCK['capacity']:g}; ms per token, MB per token in brackets):", "",
             "| config | avg k | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(cols)]
    for c in res["configs"]:
        cells = []
        for slots, pol in cols:
            name = pol if pol in simulate.DEMAND_POLICIES else f"prefetch:{pol}"
            r = next(x for x in c.get("clock", []) if x["slots"] == slots and x["policy"] == name)
            cells.append(f"{r['ms_per_token']:.2f} ({r['mb_per_token']:.2f})")
        lines.append(f"| {c['config']} | {c['avg_k']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _hit(cfg: dict, policy: str, cap: float, key: str = "cache") -> float:
    return next(r["hit_rate"] for r in cfg[key] if r["policy"] == policy and abs(r["capacity"] - cap) < 1e-9)


def tables(res: dict, cap: float = 0.1) -> str:
    pols = [p if p in simulate.DEMAND_POLICIES else f"prefetch:{p}" for p in POLICIES]
    caps = sorted({r["capacity"] for r in res["configs"][0]["cache"]})
    lines = [f"Expert hit rate at {cap:g} of all experts cached (decode tokens, prefetch depth {res['depth']}):", "",
             "| config | avg k | " + " | ".join(pols) + " | router, per-layer quota ~ k |",
             "|---|---|" + "---|" * (len(pols) + 1)]
    for c in res["configs"]:
        lines.append(f"| {c['config']} | {c['avg_k']:.2f} | " + " | ".join(f"{_hit(c, p, cap):.3f}" for p in pols)
                     + f" | {_hit(c, 'prefetch:router', cap, 'cache_k_quota'):.3f} |")
    lines += ["", "Hit rate by capacity (full k): " + ", ".join(
        f"{p} " + "/".join(f"{_hit(res['configs'][0], p, x):.2f}" for x in caps) for p in pols) + f" at {caps}", "",
        "Look-ahead router predictor on decode tokens (recall@k = precision at k guesses):", "",
        "| config | predictor | recall@k | F1 | accuracy | all-zeros accuracy |", "|---|---|---|---|---|---|"]
    for c in res["configs"]:
        for name, r in c["predictors"].items():
            lines.append(f"| {c['config']} | {name} | {r['recall']:.3f} | {r['f1']:.3f} | {r['accuracy']:.3f} | "
                         f"{r['all_zeros_accuracy']:.3f} |")
    return "\n".join(lines)


def targets(res: dict, cap: float = 0.1) -> dict:
    full = res["configs"][0]
    best = max(("prefetch:router", "prefetch:learned"), key=lambda p: _hit(full, p, cap))
    pred, lru, bel = (_hit(full, p, cap) for p in (best, "lru", "belady"))
    # a ratio against a zero hit rate is no result: None, and the target counts as not met
    out = {"best_predictor": best, "predictor_vs_lru": pred / lru if lru > 0 else None,
           "predictor_of_belady": pred / bel if bel > 0 else None, "hit_rates": {"predictor": pred, "lru": lru, "belady": bel}}
    met = {"predictor prefetch >= 3x LRU": out["predictor_vs_lru"] is not None and out["predictor_vs_lru"] >= 3,
           "predictor prefetch >= 0.85 x Belady": out["predictor_of_belady"] is not None and out["predictor_of_belady"] >= 0.85}
    lexi = next((c for c in res["configs"] if c["config"] == "lexi 0.75"), None)
    uni = next((c for c in res["configs"] if c["config"] == "uniform 0.75"), None)
    if lexi and uni:
        better = [p for p in ("lru", "lfu", "eamc", "belady", "prefetch:router", "prefetch:learned")
                  if _hit(lexi, p, cap) > max(_hit(full, p, cap), _hit(uni, p, cap))]
        out["lexi_0.75_raises"] = better
        met["lexi 0.75 raises every policy over full and uniform"] = len(better) == 6
    if lexi and uni and lexi.get("clock") and uni.get("clock"):
        def ms(c, pol):
            return next(r["ms_per_token"] for r in c["clock"] if r["slots"] == "global" and r["policy"] == pol)
        pols = ["lru", "belady", "prefetch:router", "prefetch:learned"]
        faster = [p for p in pols if ms(lexi, p) < ms(uni, p)]
        out["lexi_0.75_faster_than_uniform_on_clock"] = faster
        met["lexi 0.75 faster than uniform 0.75 on the clock for every policy"] = len(faster) == len(pols)
    out["met"] = met
    return out


def plot(res: dict, out) -> str:
    from ..measure.plots import pyplot
    plt = pyplot()
    shown = [c for c in res["configs"] if c["config"] in ("full", "lexi 0.75", "uniform 0.75")]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6), sharey=True)
    for ax, c in zip(axes, shown):
        simulate.draw_hit_rates(ax, c["cache"])
        ax.set_title(f"{c['config']} (avg k {c['avg_k']:.2f})", fontsize=9)
    axes[0].set_ylabel("expert hit rate (decode)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return str(out)
