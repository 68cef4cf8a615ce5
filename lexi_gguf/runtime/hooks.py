"""The routing hook of the lexi routing-replay patch (llama_lexi_set_routing), shared: a context may have one
function, called on the CPU in layer order for every MoE layer and ubatch right after the router (ids:
the experts about to run, [n_tokens][n_used] int32, may be overwritten) and again with the weights (ids
NULL). Its clients here: routing replay (runtime.replay) rewrites the ids, then the expert cache
(runtime.expertcache) sees the final ones."""
from __future__ import annotations

import ctypes

from .. import LexiError
from .binding import libllama

ROUTE_FN = ctypes.CFUNCTYPE(None, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_int32),
                            ctypes.POINTER(ctypes.c_float), ctypes.c_void_p)
# the order clients of one context's hook run in: replay rewrites the ids, then the expert cache sees the final ones
ORDER_REPLAY, ORDER_CACHE = 0, 10


class RoutingHooks:
    """The one routing function a context may have (llama_lexi_set_routing), shared: each client is a
    Python callable fn(il, n_tokens, n_used, ids, weights) run in `order`, so a later one sees the ids an
    earlier one wrote. Installed while it has clients; the router's own routing when the last one goes.
    A client catches its own exceptions (none may cross the C callback)."""

    def __init__(self, llm):
        self.llm, self.clients = llm, []
        self._fn = ROUTE_FN(self._cb)

    @classmethod
    def of(cls, llm) -> "RoutingHooks":
        hooks = getattr(llm, "_lexi_routing_hooks", None)
        if hooks is None:
            hooks = llm._lexi_routing_hooks = cls(llm)
        return hooks

    def _cb(self, il, n_tokens, n_used, ids, weights, _user) -> None:
        for _, fn in self.clients:
            fn(il, n_tokens, n_used, ids, weights)

    def add(self, fn, order: int) -> None:
        was = bool(self.clients)
        self.clients = sorted(self.clients + [(order, fn)], key=lambda c: c[0])
        if not was:
            set_routing(self.llm, ctypes.cast(self._fn, ctypes.c_void_p))

    def remove(self, fn) -> None:
        self.clients = [c for c in self.clients if c[1] != fn]
        if not self.clients and self.llm.ctx is not None:
            set_routing(self.llm, None)


def set_routing(llm, fn) -> None:
    """Install `fn` (a ROUTE_FN as a void pointer; None: the router's own routing) on llm's context."""
    set_fn = getattr(libllama(), "llama_lexi_set_routing", None)
    if set_fn is None:
        raise LexiError("the llama_cpp in use has no llama_lexi_set_routing: it is not the lexi-patched build; run `make setup`")
    set_fn.restype, set_fn.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    set_fn(llm.ctx, fn, None)
