"""`lexi-gguf synth`: a GGUF at the exact shape of a released MoE (testbeds.shapes), at the quant mix people
download, with random weights in valid blocks and the real vocabulary, so the runtime's memory traffic and
the cache studies run at true size without downloading anything.

Every quantized tensor is written as blocks of its ggml type: random bytes, with the blocks' scale fields
(fp16 d / dmin, MXFP4's e8m0 exponent) set to finite values chosen so each matrix's weights have an RMS of
about 1/sqrt(its row length): activations stay finite through every layer and decode gives finite logits.
The bytes are real (no zero or sparse pages): a read of the file comes from the disk. Norms are ones, the
router and biases small normal values, attention sinks zero. The vocabulary's keys come from the vocab GGUF
that ships in the pinned llama.cpp tree, padded (as llama.cpp's converter pads, `[PADn]`, unused) or
trimmed to the released embedding rows. A LExI ladder is allocated (method.allocate) from a stated,
deterministic sensitivity profile: weights and ladder are synthetic, and general.description says so.

Files are cached in $LEXI_GGUF_CACHE/synth/, named by shape, quant, a hash of the shape record and the
generator version.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .. import LexiError
from ..gguf.check import gguf_py
from ..gguf.reader import GGUFModelInfo, open_one
from ..gguf.split import link_or_copy
from ..gguf.writer import lexi_metadata, write_new
from ..method.allocate import allocate
from . import shapes as S

GENERATOR = 1                              # bump when the bytes or keys written change
LADDER = (1.0, 0.875, 0.75, 0.625, 0.5)
POOL_BYTES = 4 << 20                       # random blocks per (type, scale), rotated per tensor
# the RMS of a block's integer part (for its fp16 scale) and dmin / d that centres it (K-quants' mins)
RMS = {"Q8_0": 73.9, "Q4_K": 258.0, "Q5_K": 527.0, "Q6_K": 1367.0, "Q5_0": 9.2, "Q5_1": 9.2, "IQ4_NL": 65.0,
       "IQ4_XS": 1200.0}
CENTRE = {"Q4_K": 7.5, "Q5_K": 15.5, "Q5_1": -15.5}
D_AT = {"Q6_K": 208}                       # where d lies in the block (0 for the others)


def profile(s: S.Shape) -> dict:
    """The stated synthetic sensitivity: D_j(k) = (1 + j / (n - 1)) * (1 - k / K)^2 for the j-th of n MoE
    layers, deeper layers more sensitive. Deterministic; no measured meaning."""
    n, K = len(s.moe_layers), s.k
    rows = [{"moe": i in s.moe_layers, "deviation": [(1 + s.moe_layers.index(i) / max(n - 1, 1)) * (1 - k / K) ** 2
                                                      for k in range(1, K + 1)] if i in s.moe_layers else None}
            for i in range(s.layers)]
    return {"k_base": K, "n_expert": s.experts, "arch": s.arch, "layers": rows}


def ladder(s: S.Shape) -> list[dict]:
    sens = profile(s)
    return [allocate(sens, budget=b) for b in LADDER if round(b * len(s.moe_layers) * s.k) >= len(s.moe_layers)]


def describe(s: S.Shape, quant: str) -> str:
    return (f"synthetic: random weights at the shape of {s.name} ({s.source}), {quant}; the LExI ladder is allocated "
            f"from a synthetic sensitivity profile D_j(k) = (1 + j/(n-1)) (1 - k/K)^2, not measured; vocabulary "
            f"{s.vocab} ({s.n_vocab} rows); made by lexi-gguf synth (generator {GENERATOR}). Not a trained model.")


def _vocab_kv(s: S.Shape) -> dict:
    from ..runtime.build import llama_cpp_dir
    gguf = gguf_py()
    T = gguf.GGUFValueType
    p = llama_cpp_dir() / "models" / f"ggml-vocab-{s.vocab}.gguf"
    if not p.exists():
        raise LexiError(f"{p} does not exist: the shape's vocabulary {s.vocab!r} does not ship in the pinned llama.cpp "
                        "tree; name another (its models/ggml-vocab-*.gguf)")
    r, kv = open_one(p), {}
    for f in r.fields.values():
        if f.name.startswith("tokenizer."):
            kv[f.name] = [f.contents(), f.types[0], f.types[-1] if f.types[0] == T.ARRAY else None]
    n = len(kv["tokenizer.ggml.tokens"][0])
    pad = {"tokenizer.ggml.tokens": lambda i: f"[PAD{i}]", "tokenizer.ggml.token_type": lambda i: 5,   # UNUSED
           "tokenizer.ggml.scores": lambda i: 0.0}
    for key, make in pad.items():
        if key in kv:
            v = list(kv[key][0])[:s.n_vocab]
            kv[key][0] = v + [make(i) for i in range(n, s.n_vocab)]
    for key in [k for k in kv if k.endswith("_token_id")]:
        if int(kv[key][0]) >= s.n_vocab:
            del kv[key]
    if s.vocab_pre:
        kv["tokenizer.ggml.pre"] = [s.vocab_pre, T.STRING, None]
    return {k: tuple(v) for k, v in kv.items()}


def _arch_kv(s: S.Shape, quant: str, full_layers: int) -> dict:
    gguf = gguf_py()
    T, K, A = gguf.GGUFValueType, gguf.Keys.LLM, gguf.Keys.Attention
    kv: dict = {}

    def put(template, v):
        kv[template.format(arch=s.arch)] = (v, T.FLOAT32 if isinstance(v, float) else T.UINT32, None)
    put(K.CONTEXT_LENGTH, s.context), put(K.EMBEDDING_LENGTH, s.hidden), put(K.BLOCK_COUNT, s.layers)
    put(K.FEED_FORWARD_LENGTH, s.dense_ff or s.expert_ff), put(K.VOCAB_SIZE, s.n_vocab)
    put(K.EXPERT_COUNT, s.experts), put(K.EXPERT_USED_COUNT, s.k)
    if s.expert_ff_key:
        put(K.EXPERT_FEED_FORWARD_LENGTH, s.expert_ff)
    if s.shared:
        put(K.EXPERT_SHARED_COUNT, s.shared)
    if s.dense_lead:
        put(K.LEADING_DENSE_BLOCK_COUNT, s.dense_lead)
    put(A.HEAD_COUNT, s.heads), put(A.HEAD_COUNT_KV, s.kv_heads), put(A.LAYERNORM_RMS_EPS, float(s.rms_eps))
    put(gguf.Keys.Rope.FREQ_BASE, float(s.rope_base))
    if s.attention == "mla":
        put(A.KEY_LENGTH, s.kv_lora + s.rope_dim), put(A.VALUE_LENGTH, s.kv_lora), put(A.KV_LORA_RANK, s.kv_lora)
        put(A.KEY_LENGTH_MLA, s.head_dim), put(A.VALUE_LENGTH_MLA, s.v_dim), put(gguf.Keys.Rope.DIMENSION_COUNT, s.rope_dim)
        if s.layers != full_layers:     # llama.cpp knows DeepSeek-V2-Lite (no q LoRA) by its 26 / 27 layers
            put(A.Q_LORA_RANK, 0)
    else:
        put(A.KEY_LENGTH, s.head_dim), put(A.VALUE_LENGTH, s.head_dim), put(gguf.Keys.Rope.DIMENSION_COUNT, s.head_dim)
    if s.sliding_window:
        put(A.SLIDING_WINDOW, s.sliding_window)
    for suffix, v in s.extra:
        put("{arch}." + suffix, v)
    G = gguf.Keys.General
    kv[G.NAME] = (f"synthetic {s.name}", T.STRING, None)
    kv[G.DESCRIPTION] = (describe(s, quant), T.STRING, None)
    kv[G.FILE_TYPE] = (S.QUANTS[quant], T.UINT32, None)
    kv[G.QUANTIZATION_VERSION] = (2, T.UINT32, None)
    return kv


def _f16(x: float) -> np.ndarray:
    return np.array([x], np.float16).view(np.uint8)


def _pool(ty: str, sigma: float, rng) -> np.ndarray:
    """Random blocks of a ggml type whose weights have an RMS of about sigma (scale fields set)."""
    gguf = gguf_py()
    blk, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ty]]
    n = POOL_BYTES // size + 7
    if ty == "F16":
        return rng.normal(0, sigma, n * blk).astype(np.float16).view(np.uint8)
    b = rng.integers(0, 256, (n, size), dtype=np.uint8)
    if ty == "MXFP4":                  # e8m0 exponent; fp4 values are 0.5 * {0..12}: RMS ~2.93 * 2^(e-127)
        b[:, 0] = int(round(127 + np.log2(sigma / 2.93)))
        return b.reshape(-1)
    d = sigma / RMS[ty]
    at = D_AT.get(ty, 0)
    b[:, at:at + 2] = _f16(d)
    if ty in CENTRE:
        b[:, 2:4] = _f16(CENTRE[ty] * d)
    return b.reshape(-1)


class _Data:
    """Tensor i's data, made when the writer asks for it."""

    def __init__(self, plan, seed: int):
        self.plan, self.rng, self.pools = plan, np.random.default_rng(seed), {}

    def __call__(self, i: int) -> np.ndarray:
        name, ne, role, ty = self.plan[i]
        shape = tuple(reversed(ne))
        if role == "norm":
            return np.ones(shape, np.float32)
        if role == "sinks":
            return np.zeros(shape, np.float32)
        if role in ("router", "bias"):
            return self.rng.normal(0, 1 / np.sqrt(ne[0]) if role == "router" else 0.02, shape).astype(np.float32)
        sigma = float(1 / np.sqrt(ne[0]))
        key = (ty, sigma)
        if key not in self.pools:
            self.pools[key] = _pool(ty, sigma, self.rng)
        pool = self.pools[key]
        gguf = gguf_py()
        size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ty]][1] if ty != "F16" else 2
        at = int(self.rng.integers(0, len(pool) // size)) * size
        return np.resize(np.concatenate((pool[at:], pool[:at])), S.nbytes(ne, ty))


def cache_dir() -> Path:
    from ..runtime.build import cache_root
    return cache_root() / "synth"


def cache_name(s: S.Shape, quant: str, seed: int = 0) -> str:
    h = hashlib.sha256(json.dumps(asdict(s), sort_keys=True).encode()).hexdigest()[:8]
    return f"{s.name}-{quant}-{s.layers}L-{s.experts}E-{h}{f'-s{seed}' if seed else ''}-g{GENERATOR}.gguf"


def plan(s: S.Shape, quant: str) -> list[tuple[str, tuple[int, ...], str, str]]:
    return S.layout(s, quant)


def write(s: S.Shape, quant: str, out: Path, *, full_layers: int | None = None, force: bool = False,
          progress: bool = True, seed: int = 0) -> Path:
    """Write the file for shape `s` at `quant` to `out` (no cache)."""
    gguf = gguf_py()
    lay = plan(s, quant)
    kv = {**_arch_kv(s, quant, full_layers or s.layers), **_vocab_kv(s)}
    info = GGUFModelInfo(out, s.arch, s.layers, s.experts, s.k, s.moe_layers)
    rows = ladder(s)
    full = next(r for r in rows if r["budget"] == 1.0)
    kv.update(lexi_metadata(info, full["expert_used_count"], "lexi-exact", ladder=rows))
    tensors = [(n, ne, int(gguf.GGMLQuantizationType[ty]), S.nbytes(ne, ty)) for n, ne, _, ty in lay]
    return write_new(out, s.arch, kv, tensors, _Data(lay, seed), force=force, progress=progress)


def synth(s: S.Shape, quant: str, out: str | Path | None = None, *, full_layers: int | None = None,
          force: bool = False, progress: bool = True, cache: bool = True, seed: int = 0) -> dict:
    """The file for shape `s` at `quant`: from the cache when made before, else written (into the cache, then
    linked to `out`). Returns {path, seconds, bytes, cached}."""
    S.layout(s, quant)                 # refuse a bad quant before anything else
    t0 = time.perf_counter()
    out = Path(out) if out else None
    if out is not None and out.exists() and not force:
        raise LexiError(f"{out} already exists; pass --force to overwrite it")
    if not cache:
        if out is None:
            raise LexiError("synth without the cache needs an output path (-o)")
        write(s, quant, out, full_layers=full_layers, force=force, progress=progress, seed=seed)
        return {"path": out, "seconds": time.perf_counter() - t0, "bytes": out.stat().st_size, "cached": False}
    cdir = cache_dir()
    cdir.mkdir(parents=True, exist_ok=True)
    cached = cdir / cache_name(s, quant, seed)
    hit = cached.exists()
    if not hit:
        write(s, quant, cached, full_layers=full_layers, progress=progress, seed=seed)
    path = cached
    if out is not None and out.resolve() != cached.resolve():
        out.unlink(missing_ok=True)
        link_or_copy(cached, out)
        path = out
    return {"path": path, "seconds": time.perf_counter() - t0, "bytes": path.stat().st_size, "cached": hit}
