"""What a user says about the runtime expert cache (runtime.expertcache): its size (`--expert-cache`)
and its policy (`--cache-policy`); checked by runtime.options before anything loads."""
from __future__ import annotations

import re

from .. import LexiError

# POLICY:k: per-layer quotas by k; learned: nextuse eviction + look-ahead prefetch (runtime.lookahead)
CACHE_POLICIES = ("nextuse", "lru", "lfu", "learned", "nextuse:k", "lru:k", "lfu:k", "learned:k")
DEFAULT_POLICY = "nextuse"          # docs/caching.md: transfer >> compute (experts read from disk)
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text) -> int | str:
    """'4G', '3.5GiB', '512M', '123456' (bytes) -> bytes; 'auto' stays 'auto'."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().lower()
    if s == "auto":
        return "auto"
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?", s)
    if not m or (m.group(3) and not m.group(2) and m.group(3) != "b"):
        raise LexiError(f"--expert-cache {text!r}: give a size such as 4G, 3.5GiB or 512M, or auto")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def auto_size(other_bytes: int) -> int:
    """What the machine can spare: MemAvailable less the non-expert weights and a margin (1 GiB or 10 %)."""
    avail = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    if avail is None:
        raise LexiError("--expert-cache auto: /proc/meminfo has no MemAvailable; give a size such as 4G")
    return int(avail - other_bytes - max(2**30, 0.1 * avail))
