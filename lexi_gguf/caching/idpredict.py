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
from ..runtime.seqmodel import SequencePredictor, multihot as _multihot  # noqa: F401  (its home: the runtime runs it)
from .predict import lookahead_pairs


def _check(train: Trace, trace: Trace) -> None:
    if (train.n_expert, len(train.moe_layers)) != (trace.n_expert, len(trace.moe_layers)):
        raise LexiError("the training and evaluation traces are of different models (experts or MoE layers differ)")


def _topk(scores: np.ndarray, k: int) -> list[int]:
    return np.argsort(-scores, kind="stable")[:k].tolist()


def previous_predictions(trace: Trace, depth: int = 3) -> dict[int, dict]:
    """Token t's experts at layer j guessed as token t-1's (same sequence), at every distance: the
    runtime's own predictor (runtime.lookahead.Previous) replayed over the trace."""
    from ..runtime.lookahead import Previous, replay
    return replay(trace, Previous(len(trace.moe_layers), trace.n_expert), depth)


def online_predictions(trace: Trace, depth: int = 2, train: Trace | None = None) -> dict[int, dict]:
    """The runtime's default look-ahead predictor (runtime.lookahead.Coactivation: co-activation counted
    online as the routing runs), replayed over the trace; warm from `train` when given."""
    from ..runtime.lookahead import Coactivation, replay
    co = Coactivation(len(trace.moe_layers), trace.n_expert, depth)
    if train is not None:
        _check(train, trace)
        replay(train, co)
    return replay(trace, co, depth)


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


def load_predictor(path):
    """A predictor saved by `predictor train`: the sequence transformer or the router-input MLP."""
    import torch

    from .predict import LearnedPredictor
    try:
        s = torch.load(path, weights_only=True)
    except (OSError, RuntimeError) as e:
        raise LexiError(f"{path} is not a predictor saved by `lexi-gguf predictor train` ({e})") from None
    return SequencePredictor.from_state(s) if s.get("kind") == "sequence" else LearnedPredictor.load(path)
