"""The sequence predictor (MoE-Beyond's design, arXiv 2508.17137): a small causal transformer over the
sequence of tokens' expert sets (multi-hot, every layer) gives a state after each token; a head reads the
state of the tokens before, the current token's experts known so far (layers <= the source layer), the
target layer and the distance, and scores the target layer's experts (multi-label). Trained by
`lexi-gguf predictor train --kind sequence` (caching.idpredict), scored and simulated on traces, and run
online by the runtime expert cache's look-ahead (runtime.lookahead, `--cache-policy learned`): it needs
expert ids only, which is what the routing hook gives."""
from __future__ import annotations

import numpy as np

from .. import LexiError
from .tracefile import Trace


def lookahead_pairs(trace: Trace, depth: int, tokens: np.ndarray | None = None):
    """(source token, source layer j, d, target token, target layer) for look-ahead d = 1..depth: the
    target is layer j+d of the same token, or past the last MoE layer, the next token's first layers."""
    L = len(trace.moe_layers)
    toks = np.arange(len(trace.tokens)) if tokens is None else tokens
    next_of = {int(t): int(t) + 1 for t in range(len(trace.tokens) - 1) if trace.seq[t] == trace.seq[t + 1]}
    out = []
    for t in toks:
        t = int(t)
        for j in range(L):
            for d in range(1, depth + 1):
                jj = j + d
                if jj < L:
                    out.append((t, j, d, t, jj))
                elif t in next_of:
                    out.append((t, j, d, next_of[t], jj - L))
    return out



def multihot(trace: Trace) -> np.ndarray:
    """[T, L, E] float32: 1 where the expert ran."""
    T, L = trace.experts.shape[:2]
    out = np.zeros((T, L, trace.n_expert), np.float32)
    t, j, s = np.nonzero(trace.experts >= 0)
    out[t, j, trace.experts[t, j, s]] = 1.0
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
        mh = multihot(trace)
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
        mh = multihot(trace)
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



class OnlineSequence:
    """The sequence predictor run as the runtime runs it: token by token, layer by layer. Guesses equal
    SequencePredictor.predictions over the same rows (tests/test_lookahead.py): the state of the tokens
    before is encoded once per token over its window (a window's first token has none), the current
    token's experts are known up to the source layer."""

    def __init__(self, model: SequencePredictor):
        self.m, self.L, self.E = model, model.L, model.E
        self.rows: list[np.ndarray] = []             # multi-hot of this window's finished tokens
        self.cur = np.zeros((self.L, self.E), np.float32)
        self.state = None                            # after the previous token; None at a window's first
        self.i = 0                                   # the current token's index in its sequence

    def new_token(self) -> None:
        import torch
        self.rows.append(self.cur.reshape(-1).copy())
        self.cur[:] = 0.0
        self.i += 1
        if self.i % self.m.window == 0:              # a new window: no state before its first token
            self.rows, self.state = [], None
            return
        with torch.no_grad():
            x = torch.from_numpy(np.stack(self.rows))
            n = len(self.rows)
            h = self.m.embed(x) + self.m.pos.weight[:n]
            mask = torch.nn.Transformer.generate_square_subsequent_mask(n)
            self.state = self.m.encoder(h[None], mask=mask, is_causal=True)[0, -1]

    def new_sequence(self) -> None:
        self.rows, self.state, self.i = [], None, 0
        self.cur[:] = 0.0

    def observe(self, j: int, experts) -> None:
        self.cur[j, list(experts)] = 1.0

    def guess(self, j: int, d: int, jj: int, k: int) -> list[int]:
        import torch
        F = torch.nn.functional
        known = self.cur.copy()
        known[j + 1:] = 0.0
        with torch.no_grad():
            prev = torch.zeros(self.m.pos.embedding_dim) if self.state is None else self.state
            extra = torch.cat([F.one_hot(torch.tensor(jj), self.L), F.one_hot(torch.tensor(d - 1), self.m.depth)]).float()
            logits = self.m.head(torch.cat([prev, self.m.known(torch.from_numpy(known.reshape(-1))), extra]))
        return logits.argsort(descending=True)[:k].tolist()


def load(path) -> SequencePredictor:
    """A sequence predictor saved by `lexi-gguf predictor train --kind sequence`."""
    import torch
    try:
        s = torch.load(path, weights_only=True)
    except (OSError, RuntimeError) as e:
        raise LexiError(f"{path} is not a predictor saved by `lexi-gguf predictor train` ({e})") from None
    if s.get("kind") != "sequence":
        raise LexiError(f"{path} is the router-input predictor: it reads each layer's router input, which the "
                        "runtime's routing hook does not give; train one on expert ids with "
                        "`lexi-gguf predictor train TRACE --kind sequence -o PRED.pt`")
    return SequencePredictor.from_state(s)
