"""Stage 1 of LExI: data-free per-layer sensitivity.

For each MoE layer j and k in 1..k_base: D_j(k) = mean over random draws X ~ N(0, 1) of
||MoE_j(X; k) - MoE_j(X; k_base)||_F. A draw is a block of `draw_tokens` token vectors.

Top-k sets are nested (top-1 is a prefix of top-k_base), so one pass through the k_base selected
experts gives every Y_k: Y_k = sum_{s<k} w_k[s] * O[s], with O the selected experts' outputs and
w_k the routing weights that the runtime would use at k (renormalised over the first k when the
architecture renormalises). Shared experts do not depend on k and cancel in the difference.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import LexiError, __version__
from .archs import MoEModel, Routing
from .weights import LayerWeights

DEFAULT_SAMPLES = 8192      # token vectors per layer; see docs/method.md for the doubling check
DEFAULT_DRAW_TOKENS = 16    # one draw = 16 token vectors (B x L = 1 x 16)
# tokens routed and run through the experts at once: every expert's weights are read (and, from a GGUF,
# dequantized) once per chunk, so a chunk is as large as its [tokens, k, H] f32 outputs allow
CHUNK_BYTES = 512 << 20
DEV_TOKENS = 1024           # tokens per step of the deviation sum (bounds its [tokens, k, H] buffer)


def route(x: torch.Tensor, lw: LayerWeights, r: Routing, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Select experts as llama.cpp's build_moe_ffn does. Returns (idx [N, k], probs [N, k]) ordered by
    selection score, with probs the un-normalised gate values of the selected experts."""
    logits = x.float() @ lw.router.float().T
    if lw.router_bias is not None:
        logits = logits + lw.router_bias.float()
    if r.gating == "softmax":
        probs = logits.softmax(-1)
    elif r.gating == "sigmoid":
        probs = logits.sigmoid()
    else:
        raise LexiError(f"unknown gating function {r.gating!r}")
    sel = probs + lw.bias.float() if lw.bias is not None else probs
    if r.n_group > 1:
        n, e = sel.shape
        groups = sel.view(n, r.n_group, e // r.n_group)
        score = groups.topk(2, -1).values.sum(-1) if r.group_score == "top2sum" else groups.max(-1).values
        keep = score.topk(r.topk_group, -1).indices
        mask = torch.zeros_like(score, dtype=torch.bool).scatter_(1, keep, True)
        sel = sel.masked_fill(~mask.repeat_interleave(e // r.n_group, 1), float("-inf"))
    idx = sel.topk(k, -1, sorted=True).indices
    return idx, probs.gather(1, idx)


def weights_for_k(p: torch.Tensor, r: Routing, k: int, weight_norm: str = "renorm") -> torch.Tensor:
    """Routing weights over the first k selected experts, as the runtime computes them at top-k.
    p holds the gate values of the trained top-k (or more) in selection order. On architectures that
    normalise, "renorm" divides by the k survivors' sum, "base" by the trained top-k's (lexi.weight_norm)."""
    w = p[:, :k]
    if r.norm_topk:
        denom = p if weight_norm == "base" and not r.softmax_after_topk else w
        w = w / denom.sum(-1, keepdim=True).clamp_min(6.103515625e-5)  # llama.cpp clamps like this
    return w * r.scale


_FAST_DTYPE: dict[str, torch.dtype] = {}


def compute_dtype(weights: torch.dtype, device: str, requested: str = "auto") -> torch.dtype:
    """The matmul dtype. f32 weights run f32. For bf16/f16 weights, `auto` measures: bf16 matmuls are
    several times faster than f32 on CPUs with AVX512-BF16/AMX and on GPUs, but ~7x slower on AVX2-only
    CPUs (measured on the development machine), so the faster one is used. Weights are cast one expert
    at a time, so memory stays at about one layer's weights."""
    if requested != "auto":
        return getattr(torch, requested)
    if weights == torch.float32:
        return torch.float32
    if device != "cpu":
        return torch.bfloat16
    if device not in _FAST_DTYPE:
        import time as _t
        best, best_t = torch.float32, float("inf")
        for dt in (torch.bfloat16, torch.float32):
            a, b = torch.randn(512, 1024).to(dt), torch.randn(1024, 1024).to(dt)
            a @ b.T
            t0 = _t.perf_counter()
            for _ in range(3):
                a @ b.T
            el = _t.perf_counter() - t0
            if el < best_t:
                best, best_t = dt, el
        _FAST_DTYPE[device] = best
    return _FAST_DTYPE[device]


def activation(name: str, config: dict):
    """The expert's hidden activation h(gate, up) (up only for non-gated experts), as llama.cpp runs it."""
    if name == "silu":
        return lambda g, u: F.silu(g) * u
    if name == "gelu_tanh":
        return lambda g, u: F.gelu(g, approximate="tanh") * u
    if name == "swiglu_oai":   # gpt-oss: clamped SwiGLU, (up + 1) * gate * sigmoid(alpha * gate)
        limit, alpha = float(config.get("swiglu_limit", 7.0)), float(config.get("swiglu_alpha", 1.702))

        def swiglu_oai(g, u):
            g = g.clamp(max=limit)
            return (u.clamp(-limit, limit) + 1) * g * torch.sigmoid(alpha * g)
        return swiglu_oai
    if name == "relu2":        # non-gated squared ReLU (Nemotron-H)
        return lambda g, u: F.relu(u).square()
    raise LexiError(f"unknown expert activation {name!r}")


def block_inputs(x: torch.Tensor, lw: LayerWeights, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """What the router and the experts see of the block input x: x itself on most architectures; two
    differently scaled RMS-normalised copies on Gemma 4."""
    if lw.router_norm is None and lw.expert_norm is None:
        return x, x
    xn = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    xr = xn * lw.router_norm.float() if lw.router_norm is not None else x
    xe = xn * lw.expert_norm.float() if lw.expert_norm is not None else x
    return xr, xe


def expert_outputs(x: torch.Tensor, idx: torch.Tensor, lw: LayerWeights,
                   cdt: torch.dtype | None = None, act=None) -> torch.Tensor:
    """O[n, s] = expert_{idx[n, s]}(x[n]), computed per expert over its tokens. f32 result."""
    n, k = idx.shape
    cdt = cdt or lw.dtype
    act = act or activation("silu", {})
    out = torch.zeros(n, k, x.shape[1], dtype=torch.float32, device=x.device)
    xc = x.to(cdt)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=len(lw.up)).tolist()

    def lin(v, w, b, e):
        y = v @ w[e].to(cdt).T
        return y if b is None else y + b[e].to(cdt)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        pos = order[start:start + c]
        start += c
        xe = xc[pos // k]
        g = lin(xe, lw.gate, lw.gate_bias, e) if lw.gate is not None else None
        h = act(g, lin(xe, lw.up, lw.up_bias, e))
        y = lin(h, lw.down, lw.down_bias, e).float()
        if lw.expert_scale is not None:
            y = y * lw.expert_scale[e].float()
        out.view(n * k, -1)[pos] = y
    return out


@dataclass
class LayerProfile:
    deviation: list[float]   # D(1)..D(k_base)
    stderr: list[float]
    seconds: float
    flops: float
    compute_dtype: str


def profile_layer(lw: LayerWeights, model: MoEModel, samples: int, seed: int, layer: int,
                  draw_tokens: int = DEFAULT_DRAW_TOKENS, device: str = "cpu", input_mode: str = "raw",
                  norm_weight: torch.Tensor | None = None, dtype: str = "auto", weight_norm: str = "renorm",
                  inputs: torch.Tensor | None = None) -> LayerProfile:
    """inputs: the layer's real inputs [T, H] (calibrated profiling) instead of N(0, 1) draws; the first
    T - T % draw_tokens are used, in draws of draw_tokens consecutive tokens."""
    kb, r = model.k_base, model.routing
    cdt = compute_dtype(lw.dtype, device, dtype)
    if inputs is not None:
        samples = inputs.shape[0] - inputs.shape[0] % draw_tokens
        if samples < 2 * draw_tokens:
            raise LexiError(f"calibration gave {inputs.shape[0]} tokens; at least {2 * draw_tokens} are needed")
    if samples % draw_tokens:
        raise LexiError(f"--samples ({samples}) must be a multiple of the draw size ({draw_tokens})")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)  # same seed, same layer -> same X
    h = lw.router.shape[1]
    sums = torch.zeros(kb, dtype=torch.float64)
    sqs = torch.zeros(kb, dtype=torch.float64)
    n_draws = samples // draw_tokens
    act = activation(model.spec.experts.activation, model.config)
    eps = float(model.config.get("rms_norm_eps", 1e-6))
    chunk = max(draw_tokens, CHUNK_BYTES // (kb * h * 4) // draw_tokens * draw_tokens)
    step = max(draw_tokens, DEV_TOKENS // draw_tokens * draw_tokens)
    t0 = time.perf_counter()
    done = 0
    while done < samples:
        n = min(chunk, samples - done)
        x = (inputs[done:done + n].float() if inputs is not None else torch.randn(n, h, generator=gen)).to(device)
        if input_mode == "rmsnorm" and norm_weight is not None:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_weight.float().to(device)
        xr, xe = block_inputs(x, lw, eps)
        idx, p = route(xr, lw, r, kb)
        o = expert_outputs(xe, idx, lw, cdt, act)
        for s in range(0, n, step):
            m_, ps = min(step, n - s), p[s:s + step]
            # deviation weights per k: (w_k padded with zeros) - w_base, shape [kb, m, kb]
            dw = torch.zeros(kb, m_, kb, device=x.device)
            for k in range(1, kb + 1):
                dw[k - 1, :, :k] = weights_for_k(ps, r, k, weight_norm)
            dw -= weights_for_k(ps, r, kb)
            dev = torch.bmm(dw.transpose(0, 1), o[s:s + m_])                # [m, kb, H]: Y_k - Y_base
            norms = dev.view(m_ // draw_tokens, draw_tokens, kb, h).pow(2).sum((1, 3)).sqrt().T.double().cpu()
            sums += norms.sum(1)
            sqs += norms.pow(2).sum(1)
        del o
        done += n
    mean = sums / n_draws
    var = (sqs / n_draws - mean.pow(2)).clamp_min(0) * n_draws / max(n_draws - 1, 1)
    se = (var / n_draws).sqrt()
    ff = lw.up[0].shape[0]
    flops = 2.0 * samples * kb * (3 if lw.gate is not None else 2) * h * ff
    return LayerProfile(mean.tolist(), se.tolist(), time.perf_counter() - t0, flops,
                        str(cdt).replace("torch.", ""))


def profile(source, samples: int = DEFAULT_SAMPLES, seed: int = 0, device: str = "cpu",
            draw_tokens: int = DEFAULT_DRAW_TOKENS, input_mode: str = "raw", threads: int | None = None,
            progress: bool = True, dtype: str = "auto", weight_norm: str = "renorm", calib: dict | None = None) -> dict:
    """Profile every MoE layer of a weight source; returns the sensitivity dict (JSON shape in docs).
    weight_norm: how the runtime will weight a layer's fewer experts (lexi.weight_norm), so the
    deviation measured is the one that will run.
    calib: {block index: [tokens, hidden]} real inputs of every MoE layer (lexi_gguf.method.calib): calibrated
    profiling; the draws are consecutive calibration tokens and `samples` is what the text gives."""
    from ..gguf.keys import WEIGHT_NORMS
    if weight_norm not in WEIGHT_NORMS:
        raise LexiError(f"unknown weight norm {weight_norm!r}: use {' or '.join(WEIGHT_NORMS)}")
    if threads:
        torch.set_num_threads(threads)
    if device not in ("cpu", "cuda", "mps"):
        raise LexiError(f"unknown device {device!r}: use cpu, cuda or mps")
    if device == "cuda" and not torch.cuda.is_available():
        raise LexiError("--device cuda asked for, but torch sees no CUDA device")
    if device == "mps" and not torch.backends.mps.is_available():
        raise LexiError("--device mps asked for, but torch sees no Metal device")
    if samples < draw_tokens * 2:
        raise LexiError(f"--samples must be at least {draw_tokens * 2} (two draws)")
    m: MoEModel = source.model
    layers = []
    todo = list(range(m.n_layer))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(m.moe_layers), desc="profile", unit="layer")
    t0 = time.perf_counter()
    total_flops = 0.0
    dtype_w = None
    cdt_used = None
    for i in todo:
        if i not in m.moe_layers:
            layers.append({"index": i, "moe": False, "deviation": None, "stderr": None})
            continue
        lw = source.layer(i)
        lw.check_finite(f"layer {i}")
        dtype_w = str(lw.dtype).replace("torch.", "")
        if device != "cpu":
            lw = lw.to(device)
        norm_w = source.norm_weight(i) if input_mode == "rmsnorm" else None
        x_cal = None
        if calib is not None:
            if i not in calib:
                raise LexiError(f"the calibration inputs have no layer {i}: they were captured from another model")
            x_cal = torch.as_tensor(calib[i])
            if x_cal.shape[1] != lw.router.shape[1]:
                raise LexiError(f"layer {i}: calibration inputs are {x_cal.shape[1]} wide, the model's hidden size is "
                                f"{lw.router.shape[1]}: they were captured from another model")
        lp = profile_layer(lw, m, samples, seed, i, draw_tokens, device, "raw" if calib is not None else input_mode,
                           norm_w, dtype, weight_norm, inputs=x_cal)
        cdt_used = lp.compute_dtype
        total_flops += lp.flops
        layers.append({"index": i, "moe": True, "deviation": lp.deviation, "stderr": lp.stderr,
                       "seconds": round(lp.seconds, 4)})
        del lw
        if hasattr(source, "release"):
            source.release(i)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    elapsed = time.perf_counter() - t0
    for L in layers:
        if L["moe"] and not all(math.isfinite(v) for v in L["deviation"]):
            raise LexiError(f"layer {L['index']}: deviation is not finite; the weights overflow in {cdt_used}")
    return {
        "format": "lexi-sensitivity/1", "lexi_gguf_version": __version__,
        "arch": m.spec.name, "gguf_arch": m.spec.gguf_arch, "k_base": m.k_base, "n_expert": m.n_expert,
        "n_layer": m.n_layer, "routing": vars(m.routing),
        "settings": {"samples": samples if calib is None else min(len(v) for v in calib.values()) // draw_tokens * draw_tokens,
                     "seed": seed, "draw_tokens": draw_tokens, "input": "calib" if calib is not None else input_mode,
                     "device": device, "dtype": dtype_w, "compute_dtype": cdt_used, "norm": "frobenius", "threads": torch.get_num_threads(),
                     "weight_norm": weight_norm},
        "timing": {"seconds": round(elapsed, 3), "gflops": round(total_flops / 1e9, 3),
                   "gflop_per_s": round(total_flops / 1e9 / max(elapsed, 1e-9), 2)},
        "layers": layers,
    }
