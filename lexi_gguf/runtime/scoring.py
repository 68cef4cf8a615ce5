"""Scoring a loaded model on text, as llama-perplexity does: the text cut into n_ctx-token chunks
(first token replaced by BOS when the vocab adds one), the log-probabilities of each chunk's second
half, and the KL divergence between two such sets. Shared by evaluation and calibrated profiling."""
from __future__ import annotations

import numpy as np

from .. import LexiError


def text_chunks(llm, text: str, ctx: int) -> list[list[int]]:
    toks = llm.tokenize(text.encode(), add_bos=False, special=False)
    n = len(toks) // ctx
    if n < 1:
        raise LexiError(f"the text has {len(toks)} tokens, fewer than one --ctx {ctx} chunk; give more text or a smaller --ctx")
    import llama_cpp
    bos = llm.token_bos() if llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)) else None
    out = []
    for i in range(n):
        c = toks[i * ctx:(i + 1) * ctx]
        if bos is not None and bos >= 0:
            c = [bos] + c[1:]
        out.append(c)
    return out


def chunk_logprobs(llm, chunk: list[int]) -> np.ndarray:
    """log-softmax of the logits at the scored positions [ctx/2, ctx-1): each predicts the next token."""
    llm.reset()
    llm.eval(chunk)
    n = len(chunk)
    logits = np.asarray(llm.scores[n // 2: n - 1], dtype=np.float64)
    m = logits.max(-1, keepdims=True)
    return (logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))).astype(np.float32)


def token_kld(ref: np.ndarray, logprobs: np.ndarray, p_ref: np.ndarray | None = None) -> np.ndarray:
    """KL(ref || logprobs) at each position; both are log-probabilities [positions, vocab] (p_ref: exp(ref),
    when the caller already has it)."""
    return ((np.exp(ref) if p_ref is None else p_ref) * (ref - logprobs)).sum(-1)
