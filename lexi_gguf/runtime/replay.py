"""Routing replay: a loaded model runs the experts a recorded trace names instead of its router's top-k
(the lexi routing-replay patch, llama_lexi_set_routing), so a true-size file's memory traffic follows
recorded routing: a released model's routing from `trace import`, or this runtime's own from `trace`.

Per-layer k: each MoE layer keeps the first k_j of its recorded experts (traces list them best first),
so a lower budget's counts are judged on the same routing. Weights: the trace's, where it has them for
that layer at the same k; otherwise the router's probabilities of the replayed experts, normalised as
the model does. Tokens are replayed in trace order, each ubatch taking the next rows; past the end the
trace starts again (`wrapped` counts how often).
"""
from __future__ import annotations

import time

import numpy as np

from .. import LexiError
from .hooks import ORDER_REPLAY, RoutingHooks
from .tracefile import Trace

def layer_map(trace: Trace, moe_layers: list[int], n_expert: int, what: str) -> dict[int, int]:
    """block index of each of the model's MoE layers -> the trace's layer column, or a one-line refusal.
    A trace naming the same blocks maps one to one; an imported trace numbering its MoE layers 0..L-1
    maps in order when it has as many layers as the model."""
    if trace.n_expert != n_expert:
        raise LexiError(f"{what}: the trace routes over {trace.n_expert} experts a layer, the model has {n_expert}; "
                        "replay a trace of a model of this shape")
    recorded = [int(x) for x in trace.moe_layers]
    if recorded == list(moe_layers):
        return {il: j for j, il in enumerate(moe_layers)}
    if recorded == list(range(len(moe_layers))):
        return {il: j for j, il in enumerate(moe_layers)}
    raise LexiError(f"{what}: the trace has MoE layers {_span(recorded)}, the model {_span(list(moe_layers))}; "
                    "replay a trace with one column per MoE layer of this model")


def _span(xs: list[int]) -> str:
    return f"{len(xs)} ({xs[0]}..{xs[-1]})" if xs else "none"


class RoutingReplay:
    """Installed on a loaded model with `install(llm)`; `remove()` gives the router back."""

    def __init__(self, trace: Trace, moe_layers: list[int], n_expert: int, counts: list[int], *,
                 what: str = "--routing-replay"):
        self.trace = trace
        self.map = layer_map(trace, moe_layers, n_expert, what)
        short = [(il, counts[il], int(trace.counts[j])) for il, j in self.map.items() if counts[il] > trace.counts[j]]
        if short:
            il, k, rec = short[0]
            raise LexiError(f"{what}: layer {il} runs {k} experts but the trace recorded {rec} there "
                            f"({len(short)} layer(s) short); replay at counts up to the recorded k (a lower budget)")
        if len(trace.tokens) == 0:
            raise LexiError(f"{what}: the trace has no tokens")
        self.first = min(self.map)
        # a layer has weights when the trace recorded any (an imported trace may have none)
        self.has_weights = {il: bool(np.any(trace.weights[:, j] != 0)) for il, j in self.map.items()}
        self.T = len(trace.tokens)
        self.base = 0          # trace row of the current ubatch's first token
        self.next = 0
        self.tokens = 0        # tokens replayed
        self.wrapped = 0
        self.seconds = 0.0     # time spent in the callback
        self.error: Exception | None = None
        self._llm = None

    def _rows(self, n: int) -> np.ndarray:
        return (self.base + np.arange(n)) % self.T

    def _cb(self, il, n_tokens, n_used, ids, weights) -> None:
        # an exception cannot cross the C callback: keep the first and raise it after the decode
        t0 = time.perf_counter()
        try:
            j = self.map.get(il)
            if j is None:
                return
            if ids:
                if il == self.first:
                    self.base, self.next = self.next, self.next + n_tokens
                    self.tokens += n_tokens
                    self.wrapped = self.next // self.T
                np.ctypeslib.as_array(ids, shape=(n_tokens, n_used))[:] = self.trace.experts[self._rows(n_tokens), j, :n_used]
            elif weights and self.has_weights[il] and n_used == self.trace.counts[j]:
                np.ctypeslib.as_array(weights, shape=(n_tokens, n_used))[:] = self.trace.weights[self._rows(n_tokens), j, :n_used]
        except Exception as e:      # noqa: BLE001
            self.error = self.error or e
        finally:
            self.seconds += time.perf_counter() - t0

    def install(self, llm) -> "RoutingReplay":
        RoutingHooks.of(llm).add(self._cb, ORDER_REPLAY)
        self._llm = llm
        return self

    def remove(self) -> None:
        if self._llm is not None:
            RoutingHooks.of(self._llm).remove(self._cb)
        self._llm = None

    def check(self) -> None:
        """Raise what went wrong inside the callback, if anything did."""
        if self.error is not None:
            raise LexiError(f"routing replay failed inside the callback: {self.error!r}")

    def summary(self) -> dict:
        return {"tokens": self.tokens, "trace_tokens": self.T, "wrapped": self.wrapped,
                "callback_seconds": round(self.seconds, 4)}


def fits(trace: Trace, path, counts: list[int], what: str = "--routing-replay") -> RoutingReplay:
    """Refuse (one line) a trace whose layers, experts or k do not fit the file at these counts, before
    anything is loaded."""
    from ..gguf.reader import model_info
    info = model_info(path)
    if not info.is_moe:
        raise LexiError(f"{what}: {path} has no MoE layers to replay routing into")
    return RoutingReplay(trace, list(info.moe_layers), info.expert_count, counts, what=what)


def for_model(llm, path, trace: Trace | str, counts: list[int] | None = None, *,
              what: str = "--routing-replay") -> RoutingReplay:
    """A replay of `trace` (a Trace or its file) fitted to the loaded model, installed. counts: what each
    layer runs (default: as loaded)."""
    from .llama import n_expert_active
    tr = Trace.load(trace) if not isinstance(trace, Trace) else trace
    return fits(tr, path, counts or n_expert_active(llm), what).install(llm)
