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
from .trace import Trace


def _routers(gguf_path, moe_layers) -> tuple[dict[int, np.ndarray], str]:
    from ..gguf_io import open_reader
    from ..gguf_source import _routing, _to_torch
    r = open_reader(gguf_path)
    by_name = {t.name: t for t in r.tensors}
    from ..gguf_io import model_info
    info = model_info(gguf_path, r)
    out = {}
    for il in moe_layers:
        t = by_name.get(f"blk.{il}.ffn_gate_inp.weight")
        if t is None:
            raise LexiError(f"{gguf_path} has no router for block {il} (blk.{il}.ffn_gate_inp.weight)")
        w = _to_torch(t).float().numpy()
        out[il] = w.reshape(info.expert_count, -1)
    return out, _routing(r, info.arch).gating


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
