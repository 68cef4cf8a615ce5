"""`lexi-gguf bench`: llama-bench-like prefill (pp) and decode (tg) throughput through the patched
llama-cpp-python, for full, uniform and lexi at each budget. Median of repetitions, with min and max.
Writes a markdown table, JSON (with the machine) and a PNG of tok/s against average k."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from .configs import run_configs
from ..runtime.cpu import machine
from ..gguf.reader import active, footprint
from ..runtime.llama import load
from ..runtime.options import merged


def backend_name(n_gpu_layers: int) -> str:
    from ..runtime.build import runtime_record
    rec = runtime_record() or {}
    b = rec.get("backend", "cpu")
    return "CPU" if n_gpu_layers == 0 or b == "cpu" else b.upper()


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(path, kv: dict, *, n_prompt=512, n_gen=128, reps=3, threads=None, n_gpu_layers=None, prefetch=None,
            repack: str | None = None, options=None, replay=None, counts: list[int] | None = None,
            set_counts: list[int] | None = None) -> dict:
    """options: how the model is loaded (runtime.options.LoadOptions); threads, n_gpu_layers, prefetch,
    repack: its fields one by one (a value given wins). replay: a trace (or its file) whose routing the
    model runs instead of its router's (runtime.replay), at `counts` (default: as loaded). set_counts:
    run these per-block counts (runtime.set_expert_counts) instead of the loaded ones."""
    import numpy as np
    llm = load(path, options=options, kv_overrides=kv, n_ctx=n_prompt + n_gen + 16, n_batch=min(512, n_prompt),
               n_threads=threads, n_gpu_layers=n_gpu_layers, prefetch=prefetch, repack=repack)
    if set_counts is not None:
        from ..runtime.llama import set_expert_counts
        set_expert_counts(llm, set_counts)
    rp = None
    if replay is not None:
        from ..runtime.replay import for_model
        rp = for_model(llm, path, replay, counts)
    rng = np.random.default_rng(0)
    vocab = llm.n_vocab()
    prompt = rng.integers(100, vocab, n_prompt).tolist()   # random tokens, as llama-bench uses
    gen = rng.integers(100, vocab, n_gen).tolist()
    import llama_cpp

    def sync():
        # an asynchronous backend (RPC, GPUs) may return from llama_decode before the work is done
        llama_cpp.llama_synchronize(llm.ctx)
    llm.reset()
    llm.eval(prompt[:16])                                   # warm-up
    pp, tg = [], []
    for _ in range(reps):
        llm.reset()
        pp.append(n_prompt / _time(lambda: (llm.eval(prompt), sync())))
        llm.reset()

        def decode():
            for t in gen:
                llm.eval([t])
            sync()
        tg.append(n_gen / _time(decode))
    replayed = {}
    if rp is not None:
        rp.check()
        rp.remove()
        replayed = {"replay": rp.summary()}
    cache = getattr(llm, "_lexi_expert_cache", None)       # runtime.expertcache (LoadOptions.expert_cache)
    if cache is not None:
        cache.check()
        replayed["expert_cache"] = cache.summary()
    llm.close()  # free the model before the next configuration loads
    return {"pp_tps": statistics.median(pp), "pp_min": min(pp), "pp_max": max(pp),
            "tg_tps": statistics.median(tg), "tg_min": min(tg), "tg_max": max(tg), **replayed}


def bench(path, budgets, *, n_prompt=512, n_gen=128, reps=3, threads=None, n_gpu_layers=None, progress=True,
          prefetch=None, options=None, replay=None, custom: list[int] | None = None) -> dict:
    """replay: a trace (or its file) every configuration runs the routing of, each layer at its own k
    (runtime.replay); checked against the file before anything is measured."""
    opts = merged(options, threads=threads, n_gpu_layers=n_gpu_layers, prefetch=prefetch)
    fp = footprint(path)
    configs = run_configs(path, budgets, custom)
    full_bytes = active(fp, configs[0].counts)[0]
    if replay is not None:
        from ..runtime.replay import fits
        from ..runtime.trace import Trace
        replay = Trace.load(replay) if not isinstance(replay, Trace) else replay
        for c in configs:
            fits(replay, path, c.counts)
    rows = []
    for c in configs:
        if progress:
            print(f"  bench {c.label:<14} k={c.counts}", flush=True)
        m = measure(path, c.kv, n_prompt=n_prompt, n_gen=n_gen, reps=reps, options=opts, replay=replay, counts=c.counts,
                    set_counts=c.counts if c.config == "custom" else None)
        b = active(fp, c.counts)[0]
        rows.append({"config": c.config, "budget": c.budget, "avg_k": c.avg_k, "expert_used_count": c.counts,
                     "active_bytes": b, "ideal_speedup": full_bytes / b, **m})
    full = rows[0]
    for r in rows:
        r["tg_speedup"] = r["tg_tps"] / full["tg_tps"]
        r["pp_speedup"] = r["pp_tps"] / full["pp_tps"]
    return {"model": str(path), "backend": backend_name(opts.n_gpu_layers), "threads": opts.threads or os.cpu_count(),
            "n_gpu_layers": opts.n_gpu_layers, "n_prompt": n_prompt, "n_gen": n_gen, "reps": reps,
            "routing": "router" if replay is None else f"replayed from {replay.meta.get('source') or replay.meta.get('model', '?')}",
            "machine": machine(), "rows": rows}


def table(res: dict) -> str:
    pp, tg = f"pp{res['n_prompt']}", f"tg{res['n_gen']}"
    lines = [f"| config | budget | avg k | backend | threads | {pp} t/s | {tg} t/s | tg speed-up | ideal (active bytes) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['config']} | {r['budget']:g} | {r['avg_k']:.2f} | {res['backend']} | {res['threads']} | "
                     f"{r['pp_tps']:.1f} ({r['pp_min']:.1f}-{r['pp_max']:.1f}) | {r['tg_tps']:.1f} ({r['tg_min']:.1f}-{r['tg_max']:.1f}) | "
                     f"{r['tg_speedup']:.2f}x | {r['ideal_speedup']:.2f}x |")
    return "\n".join(lines)


def plot(res: dict, out) -> Path:
    from .plots import pyplot
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, name in ((axes[0], "pp_tps", f"prefill pp{res['n_prompt']}"), (axes[1], "tg_tps", f"decode tg{res['n_gen']}")):
        for cfg, style in (("full", "ks"), ("uniform", "o--"), ("lexi", "^-")):
            rs = sorted((r for r in res["rows"] if r["config"] == cfg), key=lambda r: r["avg_k"])
            if rs:
                ax.errorbar([r["avg_k"] for r in rs], [r[key] for r in rs],
                            yerr=[[r[key] - r[key.replace("tps", "min")] for r in rs],
                                  [r[key.replace("tps", "max")] - r[key] for r in rs]], fmt=style, label=cfg, capsize=3)
        ax.set_xlabel("average active experts per MoE layer")
        ax.set_ylabel("tokens / s")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{Path(res['model']).name} on {res['backend']} ({res['machine']['cpu']}, {res['threads']} threads)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def switch_bench(path, budgets, *, n_gen=64, switches=20, threads=None, n_gpu_layers=None, progress=True,
                 options=None) -> dict:
    """`bench --switch`: one loaded model, budgets switched in place (llama_lexi_set_row).

    Decode tok/s at each budget on that one context, and the switch's latency: the call itself and
    the extra time of the first decode after it (graph rebuild + scheduler re-reserve), each the
    median over `switches` switches between the first two budgets given (full <-> budget[0])."""
    import numpy as np

    from ..runtime.budgets import FULL, resolve
    from ..gguf.reader import model_info
    from ..runtime.llama import set_lexi_row
    info = model_info(path)
    choices = [resolve(info, b, Path(path).name) for b in [FULL, *(f"{b:g}" for b in budgets)]]
    opts = merged(options, threads=threads, n_gpu_layers=n_gpu_layers)
    llm = load(path, options=opts, n_ctx=n_gen + 16)
    toks = np.random.default_rng(0).integers(100, llm.n_vocab(), n_gen + 2).tolist()
    rows = []
    for c in choices:
        set_lexi_row(llm, c.row)
        llm.reset()
        llm.eval(toks[:1])                                    # warm the graph for this row
        dt = _time(lambda: [llm.eval([t]) for t in toks[1:n_gen + 1]])
        rows.append({"budget": c.name, "expert_used_count": c.counts, "tg_tps": n_gen / dt})
        if progress:
            print(f"  decode at budget {c.name:<8} {n_gen / dt:8.1f} tok/s", flush=True)
    call, first, steady = [], [], []
    a, b = choices[0], choices[1]
    for i in range(switches):
        src, dst = (a, b) if i % 2 == 0 else (b, a)
        set_lexi_row(llm, src.row)
        llm.reset()
        llm.eval(toks[:1])
        t0 = time.perf_counter()
        set_lexi_row(llm, dst.row, keep_cache=True)           # the switch alone, history kept
        t1 = time.perf_counter()
        llm.eval(toks[1:2])                                   # first decode at the new row
        t2 = time.perf_counter()
        llm.eval(toks[2:3])                                   # a steady decode at the new row
        t3 = time.perf_counter()
        call.append(t1 - t0)
        first.append(t2 - t1)
        steady.append(t3 - t2)
    llm.close()
    med = statistics.median
    return {"model": str(path), "backend": backend_name(opts.n_gpu_layers), "threads": opts.threads or os.cpu_count(),
            "n_gen": n_gen, "switches": switches, "switched": [a.name, b.name], "machine": machine(), "rows": rows,
            "switch_call_us": med(call) * 1e6, "first_decode_after_switch_ms": med(first) * 1e3,
            "steady_decode_ms": med(steady) * 1e3, "switch_overhead_ms": med([f - s for f, s in zip(first, steady)]) * 1e3}


def switch_table(res: dict) -> str:
    lines = [f"| budget | k per layer | tg{res['n_gen']} t/s (one loaded model) |", "|---|---|---|"]
    lines += [f"| {r['budget']} | {r['expert_used_count']} | {r['tg_tps']:.1f} |" for r in res["rows"]]
    lines.append("")
    lines.append(f"switch {res['switched'][0]} <-> {res['switched'][1]} (median of {res['switches']}): call "
                 f"{res['switch_call_us']:.0f} us; first decode after it {res['first_decode_after_switch_ms']:.2f} ms "
                 f"vs steady {res['steady_decode_ms']:.2f} ms (overhead {res['switch_overhead_ms']:.2f} ms)")
    return "\n".join(lines)
