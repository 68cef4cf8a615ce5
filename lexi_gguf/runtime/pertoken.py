"""Per-token expert counts inside each layer's k, through the routing hook (llama_lexi_set_routing): the
ways of running fewer experts that decide token by token, to compare with per-layer counts (issue 32).

* SER (ik_llama.cpp's `-ser Kmin,t`): a token keeps its top Kmin experts, and each further one of the
  layer's k only if its probability is >= t x the top expert's.
* top-p: a token keeps experts best first until their routing probability mass (the router's softmax
  over all experts) reaches p, at most the layer's k.
* top-k: exactly the best m of the layer's k (the reference: equals running the layer at k = m).

Run inside per-layer counts (set_expert_counts / a ladder row) these give "a per-layer budget with a
per-token threshold inside it". A dropped expert gets weight 0 on the layer's second hook call; where
the architecture renormalises its top-k weights (Mixtral, Qwen3-MoE: norm_topk_prob), the kept weights
are rescaled to the sum the layer's k weights had, which is exactly what the layer computes when it runs
the kept experts only; where it does not (OLMoE) the kept weights stay as they are. The dropped experts'
matmuls still run (weight 0): this measures quality at a per-token count, not its speed.

The thresholds need probabilities: SER's ratio to the top expert is the same before and after the
renormalisation and scaling the hook's weights went through, so the weights suffice; top-p needs the
router's softmax over all experts, which a normalising layer no longer shows, so the model is loaded
with `ProbsCapture.callback` as its eval callback (the graph's `ffn_moe_probs-<il>`, computed before
the hook runs for that layer).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np

from .. import LexiError
from .hooks import RoutingHooks

ORDER_PERTOKEN = 5          # after routing replay (0), before the expert cache (10)


@dataclass(frozen=True)
class TokenRule:
    kind: str               # "ser" | "top-p" | "top-k"
    kmin: int = 1           # ser: experts always kept
    t: float = 0.0          # ser: the fraction of the top expert's probability a further one needs
    p: float = 1.0          # top-p: the probability mass to reach
    m: int = 0              # top-k: experts kept

    @property
    def label(self) -> str:
        return {"ser": f"SER {self.kmin},{self.t:g}", "top-p": f"top-p {self.p:g}", "top-k": f"top-{self.m}"}[self.kind]

    @property
    def needs_probs(self) -> bool:
        return self.kind == "top-p"


def ser(kmin: int, t: float) -> TokenRule:
    if kmin < 1 or not 0 <= t <= 1:
        raise LexiError(f"SER {kmin},{t}: give Kmin >= 1 and a threshold t in [0, 1] (e.g. 1,0.3)")
    return TokenRule("ser", kmin=kmin, t=t)


def top_p(p: float) -> TokenRule:
    if not 0 < p <= 1:
        raise LexiError(f"top-p {p}: give a probability mass in (0, 1] (e.g. 0.7)")
    return TokenRule("top-p", p=p)


def top_k(m: int) -> TokenRule:
    if m < 1:
        raise LexiError(f"top-{m}: keep at least one expert")
    return TokenRule("top-k", m=m)


def keep_mask(rule: TokenRule, w: np.ndarray, p_sel: np.ndarray | None = None) -> np.ndarray:
    """[tokens, k] bool: which of each token's k experts (weights w, any order) the rule keeps. p_sel: the
    router's probabilities of those experts (top-p; SER and top-k rank by w, whose ratios are the router's)."""
    n, k = w.shape
    score = w if p_sel is None else p_sel
    order = np.argsort(-score, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(k)[None, :].repeat(n, 0), axis=1)
    if rule.kind == "top-k":
        return rank < rule.m
    if rule.kind == "ser":
        return (rank < rule.kmin) | (w >= rule.t * w.max(axis=1, keepdims=True))
    if p_sel is None:
        raise LexiError("top-p needs the router's probabilities (load the model with ProbsCapture's callback)")
    mass = np.take_along_axis(p_sel, order, axis=1).cumsum(axis=1)
    before = np.concatenate([np.zeros((n, 1)), mass[:, :-1]], axis=1)     # mass of the better experts
    keep_sorted = before < rule.p                                           # the best one always
    return np.take_along_axis(keep_sorted, rank, axis=1)


def reweight(w: np.ndarray, keep: np.ndarray, normalised: bool) -> np.ndarray:
    """The weights the layer applies with only the kept experts: 0 for the others; a normalising layer's
    kept weights rescaled to the sum its k weights had (the sum's clamp as llama.cpp's, 6.1e-5)."""
    out = np.where(keep, w, 0.0).astype(np.float32)
    if normalised:
        s_all, s_kept = w.sum(axis=1, keepdims=True), out.sum(axis=1, keepdims=True)
        out *= s_all / np.maximum(s_kept, 6.103515625e-5)
    return out


_PROBS = re.compile(r"^ffn_moe_probs-(\d+)$")


class ProbsCapture:
    """An eval callback (load(..., eval_callback=cap.callback)) keeping each MoE layer's latest router
    probabilities [tokens, n_expert] for PerToken's top-p."""

    def __init__(self, moe_layers: list[int]):
        import llama_cpp
        from .graph import ggml_lib
        self.lib = ggml_lib()
        self.moe = set(moe_layers)
        self.latest: dict[int, np.ndarray] = {}
        self.error: Exception | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._cb)

    def _cb(self, t, ask, _user) -> bool:
        try:
            m = _PROBS.match(self.lib.ggml_get_name(t).decode("utf-8", "replace"))
            if not m or int(m.group(1)) not in self.moe:
                return False if ask else True
            if not ask:
                from .graph import read_tensor
                self.latest[int(m.group(1))] = read_tensor(self.lib, t).astype(np.float64)
            return True
        except Exception as e:      # noqa: BLE001  (none may cross the C callback)
            self.error = self.error or e
            return True


class PerToken:
    """A per-token rule on a loaded model's routing hook: `install(llm)`, `remove()`; `active()` the mean
    experts a token ran per MoE layer since install (or `reset_stats()`), measured in the hook."""

    def __init__(self, rule: TokenRule, moe_layers: list[int], *, normalised: bool, probs: ProbsCapture | None = None):
        if rule.needs_probs and probs is None:
            raise LexiError(f"{rule.label} needs the router's probabilities: load the model with a ProbsCapture callback")
        self.rule, self.moe, self.normalised, self.probs = rule, set(moe_layers), normalised, probs
        self._ids: dict[int, np.ndarray] = {}
        self.kept = {il: 0 for il in moe_layers}
        self.tokens = {il: 0 for il in moe_layers}
        self.seconds = 0.0
        self.error: Exception | None = None
        self._llm = None

    def _cb(self, il, n_tokens, n_used, ids, weights) -> None:
        t0 = time.perf_counter()
        try:
            if il not in self.moe:
                return
            if ids:
                self._ids[il] = np.ctypeslib.as_array(ids, shape=(n_tokens, n_used)).copy()
                return
            if not weights:
                return
            w = np.ctypeslib.as_array(weights, shape=(n_tokens, n_used))
            p_sel = None
            if self.rule.needs_probs:
                if self.probs.error is not None:
                    raise self.probs.error
                p = self.probs.latest.get(il)
                sel = self._ids.get(il)
                if p is None or sel is None or p.shape[0] != n_tokens or sel.shape != (n_tokens, n_used):
                    raise LexiError(f"layer {il}: no router probabilities for this ubatch's {n_tokens} tokens")
                p_sel = np.take_along_axis(p, sel.astype(np.int64), axis=1)
            keep = keep_mask(self.rule, w.astype(np.float64), p_sel)
            w[:] = reweight(w.astype(np.float64), keep, self.normalised)
            self.kept[il] += int(keep.sum())
            self.tokens[il] += n_tokens
        except Exception as e:      # noqa: BLE001
            self.error = self.error or e
        finally:
            self.seconds += time.perf_counter() - t0

    def install(self, llm) -> "PerToken":
        RoutingHooks.of(llm).add(self._cb, ORDER_PERTOKEN)
        self._llm = llm
        return self

    def remove(self) -> None:
        if self._llm is not None:
            RoutingHooks.of(self._llm).remove(self._cb)
        self._llm = None

    def check(self) -> None:
        if self.error is not None:
            raise LexiError(f"{self.rule.label} failed inside the routing callback: {self.error!r}")

    def reset_stats(self) -> None:
        self.kept = dict.fromkeys(self.kept, 0)
        self.tokens = dict.fromkeys(self.tokens, 0)

    def active(self) -> float:
        """Mean experts run per token and MoE layer (over the layers' token counts)."""
        n = sum(self.tokens.values())
        return sum(self.kept.values()) / n if n else float("nan")

    def active_per_layer(self) -> dict[int, float]:
        return {il: self.kept[il] / self.tokens[il] if self.tokens[il] else float("nan") for il in sorted(self.kept)}
