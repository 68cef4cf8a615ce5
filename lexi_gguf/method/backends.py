"""Which per-layer k each backend can run, so allocation can respect it.

Metal instantiates its mul_mm_id map kernel only for these k (ggml-metal, llama.cpp #17603); other k
fail with "failed to compile pipeline" at batch >= 32. CUDA runs every k, with fast mul_mat_id paths
for CUDA_FAST_K and a slower generic path otherwise. The CPU runs every k.
"""
from __future__ import annotations

from .. import LexiError

METAL_K = frozenset({1, 2, 4, 5, 6, 8, 10, 16, 22})
CUDA_FAST_K = frozenset({2, 4, 6, 8, 10, 16, 32})


def safe_k(backend: str) -> frozenset[int] | None:
    """k values a backend is known to run; None = any k."""
    if backend == "metal":
        return METAL_K
    if backend in ("cpu", "cuda"):
        return None
    raise LexiError(f"unknown backend {backend!r}: cpu, cuda or metal")
