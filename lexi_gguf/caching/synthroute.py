"""SYNTHETIC routing traces shaped like released MoEs, for a second check of the cache policies where
no recording of the model is at hand (none is downloaded here). Not a model's routing: a generator
tuned to the statistics stated for public recordings (issue 29).

Per MoE layer a fixed popularity (log-normal, spread `skew`), per sequence a tilt of it (`topic`: the
same prompt favours some experts in every layer), and stickiness: each of the previous token's experts
is kept with probability `stick`, the rest drawn by popularity without replacement. Weights: a
Dirichlet(1) draw sorted high to low, highest on the expert drawn with the highest perturbed score.

Presets (shape as released; statistics as stated for the public recordings, generator parameters
tuned by hand to them, checked in tests/test_cache_sim.py):
- mixtral-8x7b: 32 MoE layers x 8 experts, top-2, expert 99 MB at Q4_K (3 x 4096 x 14336 weights at
  4.5 bits); tuned so that at 25 % capacity LRU hits ~0.34 and Belady ~0.62 (the recording's numbers).
- deepseek-v2-lite: 26 MoE layers (blocks 1..26; block 0 is dense) x 64 experts, top-6, expert 4.9 MB
  (3 x 2048 x 1408 at 4.5 bits); ~28 % of a layer's experts shared with the previous token.
"""
from __future__ import annotations

import numpy as np

from .. import LexiError
from ..runtime.trace import Trace

PRESETS = {
    "mixtral-8x7b": {"layers": 32, "first_moe": 0, "experts": 8, "k": 2, "expert_bytes": 99.1e6,
                     "skew": 0.6, "topic": 0.9, "stick": 0.0},
    "deepseek-v2-lite": {"layers": 26, "first_moe": 1, "experts": 64, "k": 6, "expert_bytes": 4.87e6,
                         "skew": 0.8, "topic": 1.0, "stick": 0.05},
}


def synth_trace(preset: str, seqs: int = 16, tokens: int = 64, seed: int = 0, **over) -> Trace:
    """A synthetic trace: `seqs` sequences of `tokens` decode tokens each (all marked generated)."""
    if preset not in PRESETS:
        raise LexiError(f"unknown synthetic routing preset {preset!r}: use one of {', '.join(PRESETS)}")
    p = {**PRESETS[preset], **over}
    L, E, k = p["layers"], p["experts"], p["k"]
    rng = np.random.default_rng(seed)
    pop = rng.normal(0.0, p["skew"], (L, E))
    T = seqs * tokens
    ex = np.zeros((T, L, k), np.int16)
    w = np.zeros((T, L, k), np.float32)
    for s in range(seqs):
        logit = pop + rng.normal(0.0, p["topic"], (L, E))
        prev = None
        for i in range(tokens):
            t = s * tokens + i
            score = logit + rng.gumbel(size=(L, E))
            for j in range(L):
                keep = [] if prev is None else [int(e) for e in prev[j] if rng.random() < p["stick"]]
                sc = score[j].copy()
                sc[keep] = -np.inf
                new = np.argsort(-sc, kind="stable")[: k - len(keep)].tolist()
                chosen = sorted(keep + new, key=lambda e: -score[j, e])
                ex[t, j] = chosen
                w[t, j] = np.sort(rng.dirichlet(np.ones(k)))[::-1]
            prev = ex[t]
    moe = np.arange(p["first_moe"], p["first_moe"] + L, dtype=np.int32)
    meta = {"model": f"SYNTHETIC {preset} routing (synthroute.py, not a recording)", "arch": preset,
            "synthetic": True, "n_expert": E, "k_base": k, "budget": "full", "expert_bytes": [p["expert_bytes"]] * L,
            "generator": {**p, "seqs": seqs, "tokens": tokens, "seed": seed}}
    return Trace(np.zeros(T, np.int32), np.ones(T, bool), np.repeat(np.arange(seqs, dtype=np.int32), tokens), moe,
                 np.full(L, k, np.int32), ex, w, None, meta)


def overlap(trace: Trace) -> float:
    """Fraction of a layer's experts also chosen by the previous token of the same sequence."""
    same = trace.seq[1:] == trace.seq[:-1]
    a, b = trace.experts[1:][same], trace.experts[:-1][same]
    shared = (a[..., :, None] == b[..., None, :]).any(-1) & (a >= 0)
    return float(shared.sum() / (a >= 0).sum())
