"""Look-ahead expert predictors and their honest scores.

`router`: the free baseline. The residual stream changes slowly from layer to layer, so layer
l+d's own router applied to layer l's router input (recorded in the trace with --hidden) guesses
layer l+d's experts d layers early: time to prefetch them. Needs the GGUF's router weights and
the model's gating (softmax or sigmoid), read as llama.cpp reads them.

Scores are per layer and depth: recall (of the experts really used, how many were predicted, with as
many guesses as the layer runs: recall@k_l, equal to precision then), F1, and the multi-label accuracy
beside the all-zeros predictor's, which is high only because k of E labels are positive.
"""
from __future__ import annotations

import numpy as np

from .. import LexiError
from ..runtime.trace import Trace


def _routers(gguf_path, moe_layers) -> tuple[dict[int, np.ndarray], str]:
    from ..gguf.reader import model_info, open_reader
    from ..method.gguf_weights import routing_from_gguf, tensor_to_torch
    r = open_reader(gguf_path)
    by_name = {t.name: t for t in r.tensors}
    info = model_info(gguf_path, r)
    out = {}
    for il in moe_layers:
        t = by_name.get(f"blk.{il}.ffn_gate_inp.weight")
        if t is None:
            raise LexiError(f"{gguf_path} has no router for block {il} (blk.{il}.ffn_gate_inp.weight)")
        w = tensor_to_torch(t).float().numpy()
        out[il] = w.reshape(info.expert_count, -1)
    return out, routing_from_gguf(r, info.arch).gating


def router_predictions(trace: Trace, gguf_path, depth: int = 3) -> dict[int, dict]:
    """{d: {(token, j): predicted experts of MoE layer j, from layer j-d's router input}} for d = 1..depth."""
    if trace.hidden is None:
        raise LexiError("the router predictor needs router inputs: record the trace with --hidden")
    moe = trace.moe_layers.tolist()
    routers, gating = _routers(gguf_path, moe)
    if trace.hidden.shape[-1] != next(iter(routers.values())).shape[1]:
        raise LexiError("the trace's hidden size does not match this model's routers: was it recorded from it?")
    out: dict[int, dict] = {}
    for d in range(1, depth + 1):
        pred = {}
        for j in range(d, len(moe)):
            h = trace.hidden[:, j - d].astype(np.float32)                    # [T, n_embd]
            logits = h @ routers[moe[j]].T                                    # [T, E]
            k = int(trace.counts[j])
            # softmax and sigmoid are monotone: top-k of the logits is top-k of the gate values
            top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
            for t in range(len(h)):
                pred[(t, j)] = top[t].tolist()
        out[d] = pred
    return out


def score(trace: Trace, predictions: dict, tokens: np.ndarray | None = None) -> dict:
    """Recall@k, precision, F1, accuracy and the all-zeros accuracy of predictions {(t, j): experts}."""
    E = trace.n_expert
    toks = np.arange(len(trace.tokens)) if tokens is None else tokens
    per_layer = {}
    tp_all = fp_all = fn_all = n_all = 0
    for j in range(len(trace.moe_layers)):
        tp = fp = fn = n = 0
        for t in toks:
            p = predictions.get((int(t), j))
            if p is None:
                continue
            truth = {int(e) for e in trace.experts[t, j] if e >= 0}
            ps = set(p)
            tp += len(ps & truth)
            fp += len(ps - truth)
            fn += len(truth - ps)
            n += 1
        if n == 0:
            continue
        k = int(trace.counts[j])
        per_layer[j] = {"tokens": n, "recall": tp / max(tp + fn, 1), "precision": tp / max(tp + fp, 1),
                        "f1": 2 * tp / max(2 * tp + fp + fn, 1), "accuracy": 1 - (fp + fn) / (n * E),
                        "all_zeros_accuracy": 1 - k / E}
        tp_all, fp_all, fn_all, n_all = tp_all + tp, fp_all + fp, fn_all + fn, n_all + n * E
    if not per_layer:
        raise LexiError("no predictions for the traced tokens")
    pos = sum(int(trace.counts[j]) * per_layer[j]["tokens"] for j in per_layer)
    return {"layers": per_layer, "recall": tp_all / max(tp_all + fn_all, 1), "precision": tp_all / max(tp_all + fp_all, 1),
            "f1": 2 * tp_all / max(2 * tp_all + fp_all + fn_all, 1), "accuracy": 1 - (fp_all + fn_all) / n_all,
            "all_zeros_accuracy": 1 - pos / n_all}


def random_predictions(trace: Trace, depth: int = 3, seed: int = 0) -> dict[int, dict]:
    """k uniformly random experts per (token, layer), at every depth: the floor any predictor must beat."""
    rng = np.random.default_rng(seed)
    guess = {(t, j): rng.choice(trace.n_expert, int(trace.counts[j]), replace=False).tolist()
             for t in range(len(trace.tokens)) for j in range(len(trace.moe_layers))}
    return {d: guess for d in range(1, depth + 1)}


def sure_guesses(predictions: dict[int, dict], top: int | None = None, max_distance: int | None = None) -> dict[int, dict]:
    """Fewer, surer prefetches: each target's `top` first guesses (every predictor here lists its guesses
    most confident first), from look-ahead distances <= max_distance only. A prefetch that is wrong
    still moves its bytes and takes a cache slot; this trades hit rate for bytes (docs/caching.md)."""
    if top is not None and top < 1:
        raise LexiError(f"--prefetch-top {top}: give at least 1 guess per layer")
    return {d: {key: list(g[:top]) for key, g in p.items()} for d, p in predictions.items()
            if max_distance is None or d <= max_distance}


# ---------------------------------------------------------------- learned look-ahead predictor

from ..runtime.seqmodel import lookahead_pairs  # noqa: E402,F401  (its home: the runtime's sequence model)


class LearnedPredictor:
    """MoE-Beyond in spirit, with look-ahead: a small MLP reads layer j's router input, the experts
    layer j chose, and which (layer, distance) it is asked about, and scores every expert of layer
    j+d, including the next token's first layers (the router baseline cannot reach across tokens).
    Trained on traces of one prompt set, evaluated on another."""

    def __init__(self, n_embd: int, n_expert: int, n_layer: int, depth: int, hidden: int = 256, seed: int = 0):
        import torch
        torch.manual_seed(seed)
        self.E, self.L, self.depth = n_expert, n_layer, depth
        n_in = n_embd + n_expert + n_layer + depth
        self.net = torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden),
                                       torch.nn.GELU(), torch.nn.Linear(hidden, n_expert))
        self.target_layer = torch.nn.Embedding(n_layer, n_expert)   # per target layer expert prior

    def _features(self, trace: Trace, pairs):
        import torch
        t, j, d, tt, jj = (np.array(c) for c in zip(*pairs))
        h = torch.from_numpy(trace.hidden[t, j].astype(np.float32))
        h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        chosen = torch.zeros(len(pairs), self.E)
        ex = torch.from_numpy(trace.experts[t, j].astype(np.int64))
        chosen.scatter_(1, ex.clamp_min(0), (ex >= 0).float())
        x = torch.cat([h, chosen, torch.nn.functional.one_hot(torch.from_numpy(j), self.L).float(),
                       torch.nn.functional.one_hot(torch.from_numpy(d - 1), self.depth).float()], 1)
        return x, torch.from_numpy(jj)

    def _logits(self, x, jj):
        return self.net(x) + self.target_layer(jj)

    def fit(self, trace: Trace, epochs: int = 30, lr: float = 2e-3, batch: int = 512, log=None) -> dict:
        import torch
        if trace.hidden is None:
            raise LexiError("training needs router inputs: record the training trace with --hidden")
        pairs = lookahead_pairs(trace, self.depth)
        x, jj = self._features(trace, pairs)
        y = torch.zeros(len(pairs), self.E)
        tgt = torch.from_numpy(np.stack([trace.experts[p[3], p[4]] for p in pairs]).astype(np.int64))
        y.scatter_(1, tgt.clamp_min(0), (tgt >= 0).float())
        params = [*self.net.parameters(), *self.target_layer.parameters()]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        g = torch.Generator().manual_seed(0)
        for ep in range(epochs):
            perm = torch.randperm(len(pairs), generator=g)
            total = 0.0
            for i in range(0, len(pairs), batch):
                b = perm[i:i + batch]
                loss = torch.nn.functional.binary_cross_entropy_with_logits(self._logits(x[b], jj[b]), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(b)
            if log and (ep % 10 == 0 or ep == epochs - 1):
                log(f"  epoch {ep:3d} loss {total / len(pairs):.4f}")
        return {"examples": len(pairs), "loss": total / len(pairs)}

    def predictions(self, trace: Trace, tokens: np.ndarray | None = None) -> dict[int, dict]:
        """{d: {(target token, target layer): top-k_target experts}} for the traced tokens."""
        import torch
        pairs = lookahead_pairs(trace, self.depth, tokens)
        out: dict[int, dict] = {d: {} for d in range(1, self.depth + 1)}
        with torch.no_grad():
            x, jj = self._features(trace, pairs)
            order = self._logits(x, jj).argsort(dim=1, descending=True).numpy()
        for (t, j, d, tt, jt), o in zip(pairs, order):
            out[d][(tt, jt)] = o[: int(trace.counts[jt])].tolist()
        return out

    def save(self, path) -> None:
        import torch
        torch.save({"E": self.E, "L": self.L, "depth": self.depth, "n_in": self.net[0].in_features,
                    "hidden": self.net[0].out_features, "net": self.net.state_dict(),
                    "target_layer": self.target_layer.state_dict()}, path)

    @classmethod
    def load(cls, path) -> "LearnedPredictor":
        import torch
        s = torch.load(path, weights_only=True)
        p = cls(s["n_in"] - s["E"] - s["L"] - s["depth"], s["E"], s["L"], s["depth"], hidden=s["hidden"])
        p.net.load_state_dict(s["net"])
        p.target_layer.load_state_dict(s["target_layer"])
        return p
