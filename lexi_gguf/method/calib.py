"""Calibrated Stage 1 inputs: each MoE layer's real input (what its router reads), captured from the
patched runtime while the model reads a little text, to replace LExI's N(0, 1) draws (docs/method.md).

The runtime runs the model at its own k with the trace machinery's eval callback (caching.trace), so
the inputs are exactly what build_moe_ffn sees. All layers' inputs for the calibration tokens are held
in memory (tokens x MoE layers x hidden x 4 bytes, e.g. 4096 x 48 x 2048: 1.6 GB); the weights are
still read one layer at a time."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import LexiError

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
    from ..runtime.trace import record
    from ..gguf.reader import model_info
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


KLD_TOKENS = 1024


def rows_copy(gguf_path: str | Path, rows: list[list[int]], out: str | Path, *, weight_norm: str = "renorm") -> Path:
    """A copy of the GGUF whose ladder is `rows` (per-block counts), loaded once and switched row by row
    with llama_lexi_set_row: many allocations measured without a reload each."""
    from ..gguf.writer import copy_with_metadata, lexi_metadata
    from ..gguf.reader import model_info
    info = model_info(gguf_path)
    full = info.expert_used_count * len(info.moe_layers)
    ladder = [{"budget": sum(r) / full, "total": sum(r), "expert_used_count": list(r)} for r in rows]
    return copy_with_metadata(gguf_path, out, lexi_metadata(info, list(rows[0]), "manual", ladder=ladder,
                                                            weight_norm=weight_norm), force=True, progress=False)


def mean_kld(ref: np.ndarray, logprobs: np.ndarray, p_ref: np.ndarray | None = None) -> float:
    """Mean over positions of KL(ref || logprobs), both log-probabilities [positions, vocab]."""
    from ..runtime.scoring import token_kld
    return max(float(token_kld(ref, logprobs, p_ref).mean()), 0.0)


def kld_table(gguf_path: str | Path, text: str, *, max_tokens: int = KLD_TOKENS, n_ctx: int = 256,
              threads: int | None = None, weight_norm: str = "renorm", progress: bool = True) -> dict:
    """A sensitivity table measured end to end (`--calib-metric kld`): entry (layer j, k) is the mean KL
    divergence, in nats per scored token, of the model with only layer j lowered to k from the full
    model, while the GGUF reads `text` (n_ctx chunks, at most max_tokens tokens). Same shape as
    profile()'s table, so the allocation is unchanged; it assumes the layers' costs add up.

    Costs one pass over the text per (MoE layer, k < base k): every probe is a row of a temporary
    copy's ladder, switched in place (llama_lexi_set_row) on one loaded model."""
    import tempfile
    import time

    from .. import __version__
    from ..runtime.scoring import chunk_logprobs, text_chunks
    from ..gguf.reader import model_info
    from ..runtime.llama import ROW_MODEL, load, set_lexi_row

    gguf_path = Path(gguf_path)
    if max_tokens < 32:
        raise LexiError(f"--calib-tokens {max_tokens} is too few to measure a KL divergence; give at least 32")
    n_ctx = min(n_ctx, max_tokens)
    info = model_info(gguf_path)
    kb = info.expert_used_count
    n_main = info.n_main
    moe = [i for i in info.moe_layers if i < n_main]
    full = [kb if i in info.moe_layers else 0 for i in range(info.block_count)]
    probes = [(j, k) for j in moe for k in range(1, kb)]
    rows = []
    for j, k in probes:
        r = list(full)
        r[j] = k
        rows.append(r)
    if not probes:
        raise LexiError(f"{gguf_path.name} runs 1 expert per token: there is no lower k to measure")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".kld.", dir=gguf_path.parent) as td:
        probe_file = rows_copy(gguf_path, rows, Path(td) / "probe.gguf", weight_norm=weight_norm)
        llm = load(probe_file, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=threads)
        try:
            chunks = text_chunks(llm, text, n_ctx)[: max(1, max_tokens // n_ctx)]
            kl = np.zeros((len(chunks), len(rows)))
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(desc="kld probes", total=len(chunks) * len(rows), unit="pass")
            # chunk-major: one chunk's reference log-probs in memory at a time (ctx x vocab)
            for c, chunk in enumerate(chunks):
                set_lexi_row(llm, ROW_MODEL)
                ref = chunk_logprobs(llm, chunk).astype(np.float64)
                p_ref = np.exp(ref)
                for i in range(len(rows)):
                    set_lexi_row(llm, i)
                    kl[c, i] = mean_kld(ref, chunk_logprobs(llm, chunk), p_ref)
                    if bar is not None:
                        bar.update()
            if bar is not None:
                bar.close()
        finally:
            llm.close()
    mean = kl.mean(0)
    err = kl.std(0, ddof=1) / np.sqrt(len(chunks)) if len(chunks) > 1 else np.zeros(len(rows))
    at = {p: i for i, p in enumerate(probes)}
    layers = []
    for j in range(n_main):
        if j in moe:
            layers.append({"index": j, "moe": True, "deviation": [float(mean[at[(j, k)]]) for k in range(1, kb)] + [0.0],
                           "stderr": [float(err[at[(j, k)]]) for k in range(1, kb)] + [0.0]})
        else:
            layers.append({"index": j, "moe": False, "deviation": None, "stderr": None})
    return {
        "format": "lexi-sensitivity/1", "lexi_gguf_version": __version__, "arch": info.arch, "gguf_arch": info.arch,
        "k_base": kb, "n_expert": info.expert_count, "n_layer": n_main,
        "settings": {"samples": len(chunks) * n_ctx, "seed": 0, "input": "calib-kld", "norm": "kld",
                     "ctx": n_ctx, "weight_norm": weight_norm},
        "timing": {"seconds": round(time.perf_counter() - t0, 3), "passes": len(chunks) * (len(rows) + 1)},
        "layers": layers,
    }


# --calib-metric: "kld" measures each (layer, k) end to end (kld_table); "deviation" feeds LExI's own
# Stage 1 the captured MoE inputs instead of N(0, 1) (capture_inputs + profile)
METRICS = {"kld": KLD_TOKENS, "deviation": DEFAULT_TOKENS}   # metric -> default calibration tokens


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise LexiError(f"unknown --calib-metric {metric!r}: use {' or '.join(METRICS)}")


def calibrated_sensitivity(gguf_path: str | Path, src, text: str, *, metric: str = "kld", tokens: int | None = None,
                           threads: int | None = None, weight_norm: str = "renorm", samples: int = 8192,
                           seed: int = 0, **profile_kw) -> dict:
    """The sensitivity table of a model read from `src` (its weights) and `gguf_path` (the same model for
    the runtime) while it reads `text`, by the chosen metric (profile_kw: more profile() options)."""
    check_metric(metric)
    tokens = tokens or METRICS[metric]
    if metric == "kld":
        print(f"      kld: {len(src.model.moe_layers) * (src.model.k_base - 1)} probes x {tokens} tokens of text, "
              "one pass each", flush=True)
        return kld_table(gguf_path, text, max_tokens=tokens, threads=threads, weight_norm=weight_norm)
    from .profile import profile
    calib = capture_inputs(gguf_path, text, max_tokens=tokens, threads=threads)
    print(f"      captured {min(len(v) for v in calib.values())} tokens of MoE inputs", flush=True)
    return profile(src, samples=samples, seed=seed, threads=threads, weight_norm=weight_norm, calib=calib, **profile_kw)
