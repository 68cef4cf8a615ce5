"""`lexi-gguf eval`: perplexity, and against the full model the mean and 99th-percentile KL divergence
and the same-top-1 fraction, for full, uniform and lexi at each budget. Chunking follows
llama-perplexity: n_ctx-token chunks (first token replaced by BOS when the vocab adds one), the second
half of each chunk scored. The full model's log-probabilities are kept in a temporary memmap."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .. import LexiError
from .configs import RunConfig, run_configs
from .tokenquality import normalises
from ..gguf.reader import model_info
from ..runtime.pertoken import PerToken, ProbsCapture, TokenRule
from ..runtime.procs import run_child
from ..runtime.llama import load, set_expert_counts
from ..runtime.options import merged
from ..runtime.scoring import chunk_logprobs, text_chunks, token_kld


def evaluate(path, text: str, budgets: list[float], *, ctx=512, threads=None, n_gpu_layers=None, max_chunks=None,
             progress=True, options=None, custom: list[int] | None = None, rules: list | None = None) -> dict:
    """options: how the model is loaded (runtime.options.LoadOptions); threads, n_gpu_layers: its fields.
    custom: also these counts (one per MoE layer or per block), set on the loaded model (config "custom").
    rules: also these per-token rules (runtime.pertoken: SER, top-p) at the model's own k, each a row
    whose avg_k is the mean experts a token ran per MoE layer, counted in the routing hook."""
    opts = merged(options, threads=threads, n_gpu_layers=n_gpu_layers)
    configs = run_configs(path, budgets, custom) + per_token_configs(path, rules or [])
    info = model_info(path)
    moe = list(info.moe_layers)
    norm = normalises(path) if rules else None
    rows = []
    with tempfile.TemporaryDirectory() as td:
        base = None
        chunks = None
        for c in configs:
            if progress:
                print(f"  eval  {c.label:<14} k={c.counts}", flush=True)
            cap = ProbsCapture(moe) if c.rule is not None and c.rule.needs_probs else None
            llm = load(path, options=opts, kv_overrides=c.kv, n_ctx=ctx, n_batch=min(ctx, 512), logits_all=True,
                       eval_callback=cap.callback if cap else None)
            if c.config == "custom":
                set_expert_counts(llm, c.counts)
            pt = PerToken(c.rule, moe, normalised=norm, probs=cap).install(llm) if c.rule else None
            if chunks is None:
                chunks = text_chunks(llm, text, ctx)[:max_chunks]
                per = ctx - 1 - ctx // 2
                base = np.lib.format.open_memmap(Path(td) / "full.npy", mode="w+", dtype=np.float32,
                                                 shape=(len(chunks) * per, llm.n_vocab()))
            nll, kld, same = [], [], []
            for i, ch in enumerate(chunks):
                lp = chunk_logprobs(llm, ch)
                sl = slice(i * len(lp), (i + 1) * len(lp))
                targets = np.asarray(ch[len(ch) // 2 + 1:])
                nll.append(-lp[np.arange(len(lp)), targets])
                if c.config == "full":
                    base[sl] = lp
                ref = np.asarray(base[sl], dtype=np.float64)
                kld.append(token_kld(ref, lp))
                same.append(ref.argmax(-1) == lp.argmax(-1))
            if pt is not None:
                pt.remove()
                pt.check()
                c.avg_k, c.budget = pt.active(), pt.active() / info.expert_used_count
            del llm
            nll, kld, same = np.concatenate(nll), np.concatenate(kld), np.concatenate(same)
            rows.append({"config": c.config, "budget": c.budget, "avg_k": c.avg_k, "expert_used_count": c.counts,
                         **({"rule": c.rule.label} if c.rule else {}),
                         "ppl": float(np.exp(nll.mean())), "kld_mean": float(max(kld.mean(), 0.0)),
                         "kld_p99": float(max(np.percentile(kld, 99), 0.0)), "same_top1": float(same.mean()),
                         "tokens_scored": int(len(nll))})
        del base
    return {"model": str(path), "ctx": ctx, "chunks": len(chunks), "rows": rows}


def per_token_configs(path, rules: list[TokenRule]) -> list[RunConfig]:
    """A row per per-token rule at the model's own k (lexi off); its avg_k and budget are measured."""
    if not rules:
        return []
    from ..runtime.llama import lexi_overrides
    info = model_info(path)
    kb = info.expert_used_count
    counts = [kb if i in info.moe_layers else 0 for i in range(info.block_count)]
    return [RunConfig(r.kind, 1.0, float(kb), counts, lexi_overrides(lexi=False), rule=r) for r in rules]


def cross_check(path, text_file, ctx: int, threads=None, chunks: int | None = None, n_gpu_layers: int | None = None,
                options=None) -> dict:
    """Run the patched tree's llama-perplexity on the full model (the same devices, RPC servers and split
    as `options`); its PPL should equal ours."""
    from ..runtime.build import tool
    opts = merged(options, threads=threads, n_gpu_layers=n_gpu_layers)
    exe = tool("llama-perplexity")
    cmd = [str(exe), "-m", str(path), "-f", str(text_file), "-c", str(ctx), "-b", str(min(ctx, 512)),
           "--override-kv", "lexi.enable=bool:false", "-t", str(opts.threads or 2), *opts.tool_args()]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    r = run_child(cmd, "llama-perplexity")
    return {"command": " ".join(cmd), "ppl": perplexity_from_output(r.stdout + r.stderr)}


def perplexity_from_output(text: str) -> float:
    """The final PPL that llama-perplexity prints."""
    import re
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", text)
    if not m:
        raise LexiError(f"llama-perplexity printed no final estimate: {text[-400:]}")
    return float(m.group(1))


def table(res: dict) -> str:
    lines = ["| config | budget | avg k | PPL | mean KLD | KLD p99 | same top-1 |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r.get('rule') or r['config']} | {r['budget']:.3g} | {r['avg_k']:.2f} | {r['ppl']:.3f} | {r['kld_mean']:.4f} | "
                     f"{r['kld_p99']:.4f} | {r['same_top1']:.3f} |")
    return "\n".join(lines)


def pareto_plot(ev: dict, out, bench: dict | None = None) -> Path:
    """KLD against decode speed (or average k without a bench run) for full, uniform and lexi."""
    from .plots import pyplot
    plt = pyplot()
    speed = {}
    if bench:
        speed = {(r["config"], round(r["budget"], 4)): r["tg_tps"] for r in bench["rows"]}
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for cfg, style in (("full", "ks"), ("uniform", "o--"), ("lexi", "^-"), ("ser", "s:"), ("top-p", "D:")):
        rs = [r for r in ev["rows"] if r["config"] == cfg]
        xs = [speed.get((cfg, round(r["budget"], 4)), r["avg_k"]) if bench else r["avg_k"] for r in rs]
        pts = sorted(zip(xs, [max(r["kld_mean"], 1e-6) for r in rs]))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                    label="full (KLD 0, drawn at 1e-6)" if cfg == "full" else cfg)
    ax.set_yscale("log")
    ax.set_xlabel("decode tokens / s" if bench else "average active experts per MoE layer")
    ax.set_ylabel("mean KL divergence vs full")
    ax.set_title(f"{Path(ev['model']).name}: quality vs speed", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
