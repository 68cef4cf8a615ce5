"""Look-ahead predictors that need only expert ids, so any trace works (imported ones too):

* `previous`: the previous token's experts at the same layer (known a whole token ahead).
* `coactivation`: P(expert e' at the target layer | expert e at the source layer), counted on a training
  trace (same token, or the next token's first layers past the last one); the target's top-k by the
  summed probabilities over the source layer's experts.
* `sequence` (MoE-Beyond's design, arXiv 2508.17137): a small causal transformer over the sequence of
  tokens' expert sets (multi-hot, every layer) gives a state after each token; a head reads that state
  of the tokens before, the current token's experts known so far (layers <= the source layer), the
  target layer and the distance, and scores the target layer's experts (multi-label).

All three give {d: {(token, layer): experts}} like predict.router_predictions, for predict.score and the
simulators. They are trained on one trace and evaluated on another.
"""
from __future__ import annotations

import numpy as np

from .. import LexiError
from ..runtime.trace import Trace
from .predict import lookahead_pairs


def _multihot(trace: Trace) -> np.ndarray:
    """[T, L, E] float32: 1 where the expert ran."""
    T, L = trace.experts.shape[:2]
    out = np.zeros((T, L, trace.n_expert), np.float32)
    t, j, s = np.nonzero(trace.experts >= 0)
    out[t, j, trace.experts[t, j, s]] = 1.0
    return out


def _check(train: Trace, trace: Trace) -> None:
    if (train.n_expert, len(train.moe_layers)) != (trace.n_expert, len(trace.moe_layers)):
        raise LexiError("the training and evaluation traces are of different models (experts or MoE layers differ)")


def _topk(scores: np.ndarray, k: int) -> list[int]:
    return np.argsort(-scores, kind="stable")[:k].tolist()


def previous_predictions(trace: Trace, depth: int = 3) -> dict[int, dict]:
    """Token t's experts at layer j guessed as token t-1's (same sequence), at every distance."""
    pred = {(t, j): [int(e) for e in trace.experts[t - 1, j] if e >= 0]
            for t in range(1, len(trace.tokens)) if trace.seq[t] == trace.seq[t - 1]
            for j in range(len(trace.moe_layers))}
    return {d: pred for d in range(1, depth + 1)}


def coactivation_predictions(train: Trace, trace: Trace, depth: int = 3) -> dict[int, dict]:
    _check(train, trace)
    L, E = len(trace.moe_layers), trace.n_expert
    mh_train, mh = _multihot(train), _multihot(trace)
    counts = np.zeros((depth, L, E, E), np.float64)         # [d - 1, source layer, e, e']
    for t, j, d, tt, jj in lookahead_pairs(train, depth):
        counts[d - 1, j] += np.outer(mh_train[t, j], mh_train[tt, jj])
    # P(e' at the target | e at the source): a frequent source expert does not outvote a rare one
    cond = counts / np.maximum(counts.sum(-1, keepdims=True), 1.0)
    out: dict[int, dict] = {d: {} for d in range(1, depth + 1)}
    for t, j, d, tt, jj in lookahead_pairs(trace, depth):
        out[d][(tt, jj)] = _topk(mh[t, j] @ cond[d - 1, j], int(trace.counts[jj]))
    return out


class SequencePredictor:
    def __init__(self, n_expert: int, n_layer: int, depth: int, d_model: int = 64, window: int = 64, seed: int = 0):
        import torch
        torch.manual_seed(seed)
        nn = torch.nn
        self.E, self.L, self.depth, self.window = n_expert, n_layer, depth, window
        self.embed = nn.Linear(n_layer * n_expert, d_model)
        self.pos = nn.Embedding(window, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 4, 2 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.known = nn.Linear(n_layer * n_expert, d_model)      # the current token's experts so far
        self.head = nn.Sequential(nn.Linear(2 * d_model + n_layer + depth, 2 * d_model), nn.GELU(),
                                  nn.Linear(2 * d_model, n_expert))
        self.modules = nn.ModuleList([self.embed, self.pos, self.encoder, self.known, self.head])

    def _windows(self, trace: Trace) -> list[tuple[int, int]]:
        """Token ranges the encoder sees at once: each sequence cut into windows of `window` tokens."""
        T = len(trace.tokens)
        starts = [0] + [t for t in range(1, T) if trace.seq[t] != trace.seq[t - 1]] + [T]
        return [(c, min(c + self.window, b)) for a, b in zip(starts[:-1], starts[1:]) for c in range(a, b, self.window)]

    def _states(self, trace: Trace, mh, windows=None):
        """State after each token (causal within its window), [T, d]; rows outside `windows` stay 0."""
        import torch
        T = len(trace.tokens)
        x = torch.from_numpy(mh.reshape(T, -1))
        out = torch.zeros(T, self.pos.embedding_dim)
        mask = torch.nn.Transformer.generate_square_subsequent_mask(self.window)
        for c, e in windows or self._windows(trace):
            n = e - c
            h = self.embed(x[c:e]) + self.pos.weight[:n]
            out[c:e] = self.encoder(h[None], mask=mask[:n, :n], is_causal=True)[0]
        return out

    def _inputs(self, trace: Trace, mh, pairs):
        """Per pair: state before the source token, its experts up to the source layer, target layer, d."""
        import torch
        t, j, d, tt, jj = (np.array(c) for c in zip(*pairs))
        first = np.zeros(len(trace.tokens), bool)        # a window's first token: no state before it
        first[[c for c, _ in self._windows(trace)]] = True
        known = mh[t].copy()                                       # [P, L, E]
        known[np.arange(self.L)[None, :] > j[:, None]] = 0.0
        F = torch.nn.functional
        extra = torch.cat([F.one_hot(torch.from_numpy(jj), self.L), F.one_hot(torch.from_numpy(d - 1), self.depth)], 1)
        return (torch.from_numpy(t), torch.from_numpy(first[t]), torch.from_numpy(known.reshape(len(pairs), -1)),
                extra.float(), torch.from_numpy(jj))

    def _logits(self, states, inp, idx):
        import torch
        t, first, known, extra, _ = (x[idx] for x in inp)
        prev = torch.where(first[:, None], torch.zeros_like(states[:1]), states[(t - 1).clamp_min(0)])
        return self.head(torch.cat([prev, self.known(known), extra], 1))

    def fit(self, trace: Trace, steps: int = 200, lr: float = 3e-3, windows_per_step: int = 6, log=None) -> dict:
        """AdamW on binary cross-entropy; each step encodes a few random windows and learns from every
        look-ahead pair whose source token lies in them."""
        import torch
        mh = _multihot(trace)
        pairs = lookahead_pairs(trace, self.depth)
        inp = self._inputs(trace, mh, pairs)
        y = torch.from_numpy(mh[np.array([p[3] for p in pairs]), np.array([p[4] for p in pairs])])
        wins = self._windows(trace)
        win_of = np.zeros(len(trace.tokens), np.int64)
        for w, (c, e) in enumerate(wins):
            win_of[c:e] = w
        pair_win = win_of[inp[0].numpy()]
        opt = torch.optim.AdamW(self.modules.parameters(), lr=lr, weight_decay=1e-4)
        rng = np.random.default_rng(0)
        for step in range(steps):
            chosen = rng.choice(len(wins), min(windows_per_step, len(wins)), replace=False)
            idx = torch.from_numpy(np.flatnonzero(np.isin(pair_win, chosen)))
            states = self._states(trace, mh, [wins[w] for w in chosen])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(self._logits(states, inp, idx), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if log and (step % 50 == 0 or step == steps - 1):
                log(f"  step {step:4d} loss {loss.item():.4f}")
        return {"examples": len(pairs), "loss": float(loss.item())}

    def predictions(self, trace: Trace) -> dict[int, dict]:
        import torch
        if (trace.n_expert, len(trace.moe_layers)) != (self.E, self.L):
            raise LexiError("the trace is of another model than the predictor was trained on")
        mh = _multihot(trace)
        pairs = lookahead_pairs(trace, self.depth)
        inp = self._inputs(trace, mh, pairs)
        with torch.no_grad():
            order = self._logits(self._states(trace, mh), inp, torch.arange(len(pairs))).argsort(1, descending=True)
        out: dict[int, dict] = {d: {} for d in range(1, self.depth + 1)}
        for (t, j, d, tt, jj), o in zip(pairs, order.numpy()):
            out[d][(tt, jj)] = o[: int(trace.counts[jj])].tolist()
        return out

    def save(self, path) -> None:
        import torch
        torch.save({"kind": "sequence", "E": self.E, "L": self.L, "depth": self.depth, "window": self.window,
                    "d_model": self.pos.embedding_dim, "state": self.modules.state_dict()}, path)

    @classmethod
    def from_state(cls, s: dict) -> "SequencePredictor":
        p = cls(s["E"], s["L"], s["depth"], d_model=s["d_model"], window=s["window"])
        p.modules.load_state_dict(s["state"])
        return p


def load_predictor(path):
    """A predictor saved by `predictor train`: the sequence transformer or the router-input MLP."""
    import torch

    from .predict import LearnedPredictor
    try:
        s = torch.load(path, weights_only=True)
    except (OSError, RuntimeError) as e:
        raise LexiError(f"{path} is not a predictor saved by `lexi-gguf predictor train` ({e})") from None
    return SequencePredictor.from_state(s) if s.get("kind") == "sequence" else LearnedPredictor.load(path)
