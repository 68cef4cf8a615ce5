"""Quality of per-layer and per-token expert counts at equal measured compute (issue 32 item 3): mean KL
divergence from the full model, perplexity and same-top-1 on held-out text for per-layer counts (uniform,
LExI), per-token rules (SER, top-p; runtime.pertoken) and both together (a per-layer budget with a
per-token threshold inside it), each with the average number of experts a token ran per MoE layer,
counted in the routing hook. One loaded model scores every configuration (counts set in place, rules
installed and removed), against the full model's log-probabilities kept in memory.

Dropped experts get weight 0 and still run: these are quality numbers; speed is not measured here."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import LexiError
from ..gguf.reader import model_info
from ..runtime.pertoken import PerToken, ProbsCapture, TokenRule


def normalises(path) -> bool:
    """Whether the file's MoE layers renormalise their top-k weights (as llama.cpp reads its metadata)."""
    from ..gguf.reader import open_reader
    from ..method.gguf_weights import routing_from_gguf
    return routing_from_gguf(open_reader(path), model_info(path).arch).norm_topk


class Scorer:
    """One loaded model (a second one with the router-probabilities callback for top-p) and the full
    model's log-probabilities on `chunks` chunks of `ctx` tokens of text (scored as `eval` does:
    each chunk's second half)."""

    def __init__(self, path, text: str, *, ctx: int = 256, chunks: int = 12, threads: int | None = None):
        from ..runtime.llama import ROW_MODEL, set_lexi_row
        from ..runtime.scoring import chunk_logprobs, text_chunks
        self.path, self.ctx, self.threads = Path(path), ctx, threads
        info = model_info(path)
        if not info.is_moe:
            raise LexiError(f"{self.path.name} has no MoE layers: nothing to compare")
        self.info, self.moe, self.kb = info, list(info.moe_layers), info.expert_used_count
        self.normalised = normalises(path)
        self.llm = self._load(None)
        self.cap, self._llm_probs = None, None     # a second load with the eval callback, for top-p only
        set_lexi_row(self.llm, ROW_MODEL)
        self.chunks = text_chunks(self.llm, text, ctx)[:chunks]
        self.ref = [chunk_logprobs(self.llm, c) for c in self.chunks]
        self.targets = [np.asarray(c[len(c) // 2 + 1:]) for c in self.chunks]
        ref_nll = np.concatenate([-r[np.arange(len(t)), t] for r, t in zip(self.ref, self.targets)])
        self.full_ppl = float(np.exp(ref_nll.mean()))

    def _load(self, callback):
        from ..runtime.llama import load
        return load(self.path, n_ctx=self.ctx, n_batch=self.ctx, logits_all=True, n_threads=self.threads,
                    eval_callback=callback)

    def model_for(self, rule: TokenRule | None):
        """The loaded model a rule runs on: the one with the router-probabilities callback where the rule
        needs them (the callback splits the graph at every MoE layer: about 2x slower here, so only then)."""
        if rule is None or not rule.needs_probs:
            return self.llm
        if self._llm_probs is None:
            self.cap = ProbsCapture(self.moe)
            self._llm_probs = self._load(self.cap.callback)
        return self._llm_probs

    def per_block(self, k: int) -> list[int]:
        return [k if i in self.moe else 0 for i in range(self.info.block_count)]

    def score(self, counts: list[int] | None = None, rule: TokenRule | None = None) -> dict:
        """counts: per block (None: the model's own k); rule: a per-token rule inside those counts."""
        from ..runtime.llama import ROW_MODEL, set_expert_counts, set_lexi_row
        from ..runtime.scoring import chunk_logprobs, token_kld
        t0 = time.perf_counter()
        llm = self.model_for(rule)
        if counts is None:
            set_lexi_row(llm, ROW_MODEL)
            counts = self.per_block(self.kb)
        else:
            set_expert_counts(llm, counts)
        pt = PerToken(rule, self.moe, normalised=self.normalised, probs=self.cap).install(llm) if rule else None
        kld, nll, same = [], [], []
        try:
            for ch, ref, tg in zip(self.chunks, self.ref, self.targets):
                lp = chunk_logprobs(llm, ch).astype(np.float64)
                r = ref.astype(np.float64)
                kld.append(token_kld(r, lp))
                nll.append(-lp[np.arange(len(tg)), tg])
                same.append(r.argmax(-1) == lp.argmax(-1))
        finally:
            if pt is not None:
                pt.remove()
        if pt is not None:
            pt.check()
        if self.cap is not None and self.cap.error is not None:
            raise LexiError(f"reading the router's probabilities failed: {self.cap.error!r}")
        kld, nll, same = np.concatenate(kld), np.concatenate(nll), np.concatenate(same)
        if pt is not None:
            active, per_layer = pt.active(), [round(v, 4) for v in pt.active_per_layer().values()]
        else:
            per_layer = [float(counts[il]) for il in self.moe]
            active = float(np.mean(per_layer))
        return {"counts": [counts[il] for il in self.moe], "rule": rule.label if rule else None,
                "active": float(active), "active_per_layer": per_layer,
                "kld_mean": float(max(kld.mean(), 0.0)), "kld_p99": float(max(np.percentile(kld, 99), 0.0)),
                "ppl": float(np.exp(nll.mean())), "same_top1": float(same.mean()),
                "seconds": round(time.perf_counter() - t0, 2)}

    def close(self) -> None:
        self.llm.close()
        if self._llm_probs is not None:
            self._llm_probs.close()


def frontier(points: list[dict]) -> list[dict]:
    """The points no other point beats on both axes (fewer or equal active experts, lower KLD), by active."""
    pts = sorted(points, key=lambda p: (p["active"], p["kld_mean"]))
    out, best = [], float("inf")
    for p in pts:
        if p["kld_mean"] < best:
            out.append(p)
            best = p["kld_mean"]
    return out


def at_active(points: list[dict], target: float, key: str = "kld_mean", tol: float = 0.02) -> float | None:
    """`key` of a family at `target` active experts: a measured frontier point within tol of it, else linear
    interpolation between the frontier points either side of it; None when the family does not reach
    both sides (no extrapolation)."""
    fr = frontier(points)
    near = [p for p in fr if abs(p["active"] - target) <= tol]
    if near:
        return min(near, key=lambda p: p["kld_mean"])[key]
    lo = [p for p in fr if p["active"] < target]
    hi = [p for p in fr if p["active"] > target]
    if not lo or not hi:
        return None
    a, b = lo[-1], hi[0]
    f = (target - a["active"]) / (b["active"] - a["active"])
    return a[key] + f * (b[key] - a[key])


def equal_compute(families: dict[str, list[dict]], targets: list[float]) -> list[dict]:
    """Per target average active experts: each family's KLD, PPL and same-top-1 there, and the winner."""
    rows = []
    for t in targets:
        row = {"active": t, "families": {}}
        for name, pts in families.items():
            k = at_active(pts, t)
            if k is not None:
                row["families"][name] = {"kld_mean": k, "ppl": at_active(pts, t, "ppl"),
                                         "same_top1": at_active(pts, t, "same_top1")}
        got = row["families"]
        row["best"] = min(got, key=lambda n: got[n]["kld_mean"]) if got else None
        rows.append(row)
    return rows


STYLES = {"uniform": "o--", "LExI data-free": "^-", "LExI calibrated": "v-", "SER": "s:", "top-p": "D:",
          "LExI + SER": "P-", "LExI + top-p": "X-"}


def pareto_plot(models: list[dict], out) -> Path:
    """KLD vs average active experts per MoE layer, one panel per model, every family's points and frontier."""
    from .plots import pyplot
    plt = pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.9), squeeze=False)
    for ax, m in zip(axes[0], models):
        for name, pts in m["families"].items():
            pts = [p for p in pts if p["kld_mean"] > 0]          # the full model (KLD 0) is off a log axis
            line = ax.plot([p["active"] for p in pts], [p["kld_mean"] for p in pts], STYLES.get(name, "o")[0],
                           alpha=0.35, ms=4)[0]
            fr = frontier(pts)
            ax.plot([p["active"] for p in fr], [p["kld_mean"] for p in fr], STYLES.get(name, "o-"),
                    color=line.get_color(), label=name, ms=5)
        ax.set_yscale("log")
        ax.set_xlabel("active experts per token and MoE layer (measured mean)", fontsize=8)
        ax.set_ylabel("mean KLD vs full")
        ax.set_title(f"{m['model']} (base k {m['k_base']}, {m['n_expert']} experts)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
