"""Calibrated Stage 1 inputs: each MoE layer's real input (what its router reads), captured from the
patched runtime while the model reads a little text, to replace LExI's N(0, 1) draws (docs/method.md).

The runtime runs the model at its own k with the trace machinery's eval callback (caching.trace), so
the inputs are exactly what build_moe_ffn sees. All layers' inputs for the calibration tokens are held
in memory (tokens x MoE layers x hidden x 4 bytes, e.g. 4096 x 48 x 2048: 1.6 GB); the weights are
still read one layer at a time."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import LexiError

DEFAULT_TOKENS = 4096


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise LexiError(f"{p} does not exist; give a UTF-8 text file with --calib")
    text = p.read_text(errors="replace")
    if not text.strip():
        raise LexiError(f"{p} is empty; calibration needs some text (a few thousand tokens)")
    return text


def capture_inputs(gguf_path: str | Path, text: str, *, max_tokens: int = DEFAULT_TOKENS, n_ctx: int = 512,
                   threads: int | None = None, min_tokens: int = 32) -> dict[int, np.ndarray]:
    """{block index: [tokens, hidden] float32}: every MoE layer's input while the GGUF reads `text`
    (in n_ctx chunks, at most max_tokens tokens), at the model's own k in every layer."""
    from .archs import GGUF_ARCHS
    from .caching.trace import record
    from .gguf_io import model_info
    arch = model_info(gguf_path).arch
    spec = GGUF_ARCHS.get(arch)
    if spec is not None and (spec.router_norm or spec.expert_norm):
        raise LexiError(f"{Path(gguf_path).name} ({arch}): its router and experts read differently normalised "
                        "copies of the block input and the runtime exposes only the router's, so there is no MoE "
                        "router input to capture that the profile could use; profile it data-free (leave out --calib)")
    # tokens are ~4 bytes of text: trace a generous prefix, not a whole corpus, then keep max_tokens
    try:
        tr = record(gguf_path, texts=[text[: max_tokens * 8]], no_lexi=True, hidden=True, n_ctx=n_ctx,
                    threads=threads, progress=False)
    except ValueError:   # no router input was seen (np.concatenate of nothing)
        tr = None
    if tr is None or tr.hidden is None or tr.hidden.shape[0] == 0:
        raise LexiError(f"{Path(gguf_path).name}: the runtime exposed no MoE router input to capture (its router "
                        "logits are computed outside build_moe_ffn, e.g. Gemma 4); profile it data-free "
                        "(leave out --calib)")
    n = min(len(tr.tokens), max_tokens)
    if n < min_tokens:
        raise LexiError(f"the calibration text gives only {n} tokens; give at least {min_tokens} "
                        f"(a few thousand are better)")
    return {int(il): np.ascontiguousarray(tr.hidden[:n, j], dtype=np.float32) for j, il in enumerate(tr.moe_layers)}
