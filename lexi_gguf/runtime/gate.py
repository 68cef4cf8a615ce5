"""The prefetch decision shared by the clocked simulator (caching.clock) and the runtime expert cache
(runtime.expertcache): PrefetchGate, prefetch a guess only when it is expected to pay on the clock."""
from __future__ import annotations

import numpy as np


class PrefetchGate:
    """Prefetch a guess only when it is expected to pay on the clock:

        gain = c * saved - (1 - c) * (link + displaced)

    c: the guess's confidence, the precision so far of guesses at its look-ahead distance and rank
    (counted online when the target layer runs; prior 1/2); saved: the stall it removes if right,
    clip(lead - backlog, 0, transfer) (lead: compute before its layer starts, backlog: link time already
    committed); link: the link time a wrong guess takes from demand reads; displaced: the victim's
    chance of being needed x its transfer time. A correct guess displaces what its demand read would
    have displaced, so only a wrong one pays for it. Demand reads are never queued behind it: the clock
    starts a gated prefetch only when the link's data channel frees (clock.Link, polite)."""

    def __init__(self, depth: int, kmax: int, prior: float = 1.0):
        self.right = np.full((depth + 1, kmax), prior)
        self.seen = np.full((depth + 1, kmax), 2 * prior)
        self.issued = self.refused = 0
        self.gains: list[float] = []            # the expected gain of every guess issued (tests read it)

    def confidence(self, d: int, rank: int) -> float:
        r = min(rank, self.right.shape[1] - 1)
        return float(self.right[d, r] / self.seen[d, r])

    def learn(self, d: int, guesses, truth) -> None:
        """The target layer ran: score the guesses made for it at distance d."""
        truth = set(truth)
        for r, e in enumerate(list(guesses)[: self.right.shape[1]]):
            self.seen[d, r] += 1
            self.right[d, r] += int(e) in truth

    @staticmethod
    def gain(c: float, lead: float, backlog: float, transfer: float, link: float, displaced: float) -> float:
        saved = min(transfer, max(0.0, lead - backlog))
        return c * saved - (1.0 - c) * (link + displaced)

    def decide(self, c: float, lead: float, backlog: float, transfer: float, link: float, displaced: float) -> bool:
        g = self.gain(c, lead, backlog, transfer, link, displaced)
        if g > 0:
            self.issued += 1
            self.gains.append(g)
            return True
        self.refused += 1
        return False
