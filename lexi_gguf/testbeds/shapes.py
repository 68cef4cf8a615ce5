"""Released MoE models' shapes, as data: one record per model (as mergekit describes architectures), the
tensors llama.cpp's loader creates for it (names from gguf-py's constants), and the tensor types
llama-quantize gives them at a quant mix (its rules in src/llama-quant.cpp, for the tensors that make a
file's size). `testbeds.synth` writes files from these; `trace import --like` reads expert sizes here.

Each record follows the model's released config.json and the vendored llama.cpp loader
(src/models/<arch>.cpp). `--config` takes the same fields as JSON (see `from_config`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

from .. import LexiError
from ..gguf.check import gguf_py


@dataclass(frozen=True)
class Shape:
    name: str
    arch: str                 # general.architecture
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int             # attention.key_length (MLA: the nope + rope head, key_length_mla)
    experts: int
    k: int
    expert_ff: int            # one routed expert's width
    vocab: str                # models/ggml-vocab-<vocab>.gguf of the pinned llama.cpp tree
    n_vocab: int              # the released embedding rows (the vocabulary is padded / trimmed to it)
    source: str = ""          # where the numbers come from
    vocab_pre: str = ""       # tokenizer.ggml.pre when the vocab file's is not the model's
    dense_ff: int = 0         # feed_forward_length: the leading dense blocks' width (0: expert_ff)
    dense_lead: int = 0       # leading dense blocks (DeepSeek's first_k_dense_replace)
    shared: int = 0           # shared experts per MoE block (each expert_ff wide)
    expert_ff_key: bool = True   # the arch reads expert_feed_forward_length (llama / olmoe use feed_forward_length)
    attention: str = "gqa"    # gqa | mla
    qk_norm: str = ""         # "" | head (one norm per head) | full (over all heads, OLMoE)
    bias: bool = False        # attention and expert biases, router bias (gpt-oss)
    sinks: bool = False       # attention sinks (gpt-oss)
    post_norm: bool = False   # post_attention_norm instead of ffn_norm (gpt-oss)
    sliding_window: int = 0
    kv_lora: int = 0          # MLA
    rope_dim: int = 0         # MLA: the rope part of a head
    v_dim: int = 0            # MLA: value head
    expert_quant: str = ""    # the experts' own type in the release (gpt-oss: MXFP4)
    context: int = 4096
    rope_base: float = 10000.0
    rms_eps: float = 1e-6
    extra: tuple = ()         # more {arch}.* keys: (suffix, value) pairs

    @property
    def moe_layers(self) -> list[int]:
        return list(range(self.dense_lead, self.layers))


SHAPES = {s.name: s for s in (
    Shape("qwen3-30b-a3b", "qwen3moe", 48, 2048, 32, 4, 128, 128, 8, 768, "qwen2", 151936,
          "Qwen/Qwen3-30B-A3B config.json", dense_ff=6144, qk_norm="head", context=40960, rope_base=1e6),
    Shape("mixtral-8x7b", "llama", 32, 4096, 32, 8, 128, 8, 2, 14336, "llama-spm", 32000,
          "mistralai/Mixtral-8x7B-v0.1 config.json", expert_ff_key=False, context=32768, rope_base=1e6, rms_eps=1e-5),
    Shape("deepseek-v2-lite", "deepseek2", 27, 2048, 16, 1, 192, 64, 6, 1408, "deepseek-llm", 102400,
          "deepseek-ai/DeepSeek-V2-Lite config.json", dense_ff=10944, dense_lead=1, shared=2, attention="mla",
          kv_lora=512, rope_dim=64, v_dim=128, context=163840,
          extra=(("expert_weights_scale", 1.0), ("expert_group_count", 1), ("expert_group_used_count", 1))),
    Shape("olmoe-1b-7b", "olmoe", 16, 2048, 16, 16, 128, 64, 8, 1024, "gpt-neox", 50304,
          "allenai/OLMoE-1B-7B-0924 config.json", vocab_pre="olmo", expert_ff_key=False, qk_norm="full", rms_eps=1e-5),
    Shape("gpt-oss-20b", "gpt-oss", 24, 2880, 64, 8, 64, 32, 4, 2880, "llama-bpe", 201088,
          "openai/gpt-oss-20b config.json (o200k vocabulary: none ships, llama-bpe padded to its 201,088 rows)",
          bias=True, sinks=True, post_norm=True, sliding_window=128, expert_quant="MXFP4", context=131072,
          rope_base=150000.0, rms_eps=1e-5),
)}

# llama-quantize's mixes (--quant): the file type each writes into general.file_type (llama_ftype)
QUANTS = {"Q4_K_M": 15, "Q8_0": 7, "IQ4_XS": 30, "MXFP4": 38}
# ggml's fallback when a row length is not a multiple of the type's block (tensor_type_fallback)
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}


def get(name: str) -> Shape:
    if name not in SHAPES:
        raise LexiError(f"no released shape named {name!r}: choose one of {', '.join(SHAPES)} (or --config FILE)")
    return SHAPES[name]


def from_config(path: str | Path) -> Shape:
    """A shape from a JSON object with Shape's fields (`lexi-gguf synth --config`)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise LexiError(f"--config {p}: {e}; give a JSON object with the fields of a shape (name, arch, layers, ...)") from None
    names = {f.name for f in fields(Shape)}
    unknown = sorted(set(d) - names) if isinstance(d, dict) else ["(not an object)"]
    if unknown:
        raise LexiError(f"--config {p}: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(sorted(names))}")
    try:
        return Shape(**{**d, "extra": tuple(map(tuple, d.get("extra", ())))})
    except TypeError as e:
        raise LexiError(f"--config {p}: {e}") from None


def reduced(s: Shape, layers: int | None = None, experts: int | None = None) -> Shape:
    """The same per-layer shape with fewer layers (dense leading blocks kept first) or experts."""
    if layers is not None and not 1 <= layers <= s.layers:
        raise LexiError(f"--layers {layers}: {s.name} has {s.layers} layers; give 1..{s.layers}")
    if experts is not None and not s.k <= experts <= s.experts:
        raise LexiError(f"--experts {experts}: {s.name} routes {s.k} of {s.experts}; give {s.k}..{s.experts}")
    L = layers or s.layers
    return replace(s, layers=L, dense_lead=min(s.dense_lead, max(L - 1, 0)), experts=experts or s.experts)


def tensors(s: Shape) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, ne (ggml order, ne[0] first), role) of every tensor the loader creates for this shape.
    role: matrix (quantized), norm, router, bias, sinks."""
    gguf = gguf_py()
    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    H, E, F = s.hidden, s.experts, s.expert_ff
    out = [(names[T.TOKEN_EMBD] + ".weight", (H, s.n_vocab), "matrix"),
           (names[T.OUTPUT_NORM] + ".weight", (H,), "norm"),
           (names[T.OUTPUT] + ".weight", (H, s.n_vocab), "matrix")]
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    for i in range(s.layers):
        def t(kind, ne, role="matrix", suffix="weight"):
            out.append((names[kind].format(bid=i) + "." + suffix, ne, role))
        t(T.ATTN_NORM, (H,), "norm")
        if s.attention == "mla":
            nope = s.head_dim - s.rope_dim
            t(T.ATTN_Q, (H, s.heads * s.head_dim))
            t(T.ATTN_KV_A_MQA, (H, s.kv_lora + s.rope_dim))
            t(T.ATTN_KV_A_NORM, (s.kv_lora,), "norm")
            t(T.ATTN_K_B, (nope, s.kv_lora, s.heads))
            t(T.ATTN_V_B, (s.kv_lora, s.v_dim, s.heads))
            t(T.ATTN_OUT, (s.heads * s.v_dim, H))
        else:
            for kind, n in ((T.ATTN_Q, q), (T.ATTN_K, kv), (T.ATTN_V, kv)):
                t(kind, (H, n))
                if s.bias:
                    t(kind, (n,), "bias", "bias")
            t(T.ATTN_OUT, (q, H))
            if s.bias:
                t(T.ATTN_OUT, (H,), "bias", "bias")
            if s.qk_norm:
                t(T.ATTN_Q_NORM, (s.head_dim if s.qk_norm == "head" else q,), "norm")
                t(T.ATTN_K_NORM, (s.head_dim if s.qk_norm == "head" else kv,), "norm")
            if s.sinks:
                t(T.ATTN_SINKS, (s.heads,), "sinks")
        t(T.ATTN_POST_NORM if s.post_norm else T.FFN_NORM, (H,), "norm")
        if i < s.dense_lead:
            D = s.dense_ff or F
            t(T.FFN_GATE, (H, D)), t(T.FFN_UP, (H, D)), t(T.FFN_DOWN, (D, H))
            continue
        t(T.FFN_GATE_INP, (H, E), "router")
        if s.bias:
            t(T.FFN_GATE_INP, (E,), "bias", "bias")
        t(T.FFN_GATE_EXP, (H, F, E)), t(T.FFN_UP_EXP, (H, F, E)), t(T.FFN_DOWN_EXP, (F, H, E))
        if s.bias:
            t(T.FFN_GATE_EXP, (F, E), "bias", "bias"), t(T.FFN_UP_EXP, (F, E), "bias", "bias")
            t(T.FFN_DOWN_EXP, (H, E), "bias", "bias")
        if s.shared:
            t(T.FFN_GATE_SHEXP, (H, F * s.shared)), t(T.FFN_UP_SHEXP, (H, F * s.shared))
            t(T.FFN_DOWN_SHEXP, (F * s.shared, H))
    return out


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def quant_type(s: Shape, quant: str, name: str, ne: tuple[int, ...], role: str, i_wv: int = 0, n_wv: int = 0) -> str:
    """The ggml type llama-quantize gives this tensor at `quant` (llama_tensor_get_type, no imatrix, for the
    categories that matter here). Norms, router, biases and sinks stay F32. i_wv / n_wv: this tensor's
    index among the attn_v-like tensors and their count."""
    if role != "matrix":
        return "F32"
    if quant not in QUANTS:
        raise LexiError(f"--quant {quant}: synth writes {', '.join(QUANTS)}")
    if quant == "MXFP4" and s.expert_quant != "MXFP4":
        raise LexiError(f"--quant MXFP4: {s.name}'s experts are not released in MXFP4; use Q4_K_M, Q8_0 or IQ4_XS")
    default = {"Q4_K_M": "Q4_K", "Q8_0": "Q8_0", "IQ4_XS": "IQ4_XS", "MXFP4": "Q8_0"}[quant]
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    n8 = s.experts == 8
    new = default
    if name == "output.weight":
        new = "Q8_0" if quant == "MXFP4" or ne[0] % 256 else ("Q6_K" if default != "Q8_0" else "Q8_0")
    elif quant == "MXFP4":
        new = "MXFP4" if len(ne) == 3 and "_exps" in name else "Q8_0"
    elif name.startswith("token_embd"):
        new = default
    elif ".attn_v." in name:
        if quant == "IQ4_XS" and s.heads // max(s.kv_heads, 1) >= 4:
            new = "Q5_K"
        elif quant == "Q4_K_M" and _more_bits(i_wv, n_wv):
            new = "Q6_K"
        if n8:
            new = "Q8_0"
    elif ".attn_k." in name and n8:
        new = "Q8_0"
    elif "ffn_down" in name:
        if quant == "Q4_K_M" and _more_bits(layer, s.layers):
            new = "Q6_K"
        elif quant == "IQ4_XS" and layer < s.layers // 8:
            new = "Q5_K"
    elif ".attn_output." in name and n8 and quant in ("Q4_K_M", "IQ4_XS"):
        new = "Q5_K"
    blk = gguf_py().GGML_QUANT_SIZES[gguf_py().GGMLQuantizationType[new]][0]
    if ne[0] % blk:
        new = FALLBACK.get(new, "F16")
        if ne[0] % gguf_py().GGML_QUANT_SIZES[gguf_py().GGMLQuantizationType[new]][0]:
            new = "F16"
    return new


def layout(s: Shape, quant: str) -> list[tuple[str, tuple[int, ...], str, str]]:
    """(name, ne, role, ggml type name) of every tensor at this quant mix."""
    ts = tensors(s)
    n_wv = sum(".attn_v.weight" in n for n, _, _ in ts)
    out, i_wv = [], 0
    for name, ne, role in ts:
        out.append((name, ne, role, quant_type(s, quant, name, ne, role, i_wv, n_wv)))
        i_wv += ".attn_v.weight" in name
    return out


def nbytes(ne: tuple[int, ...], type_name: str) -> int:
    gguf = gguf_py()
    blk, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    n = 1
    for d in ne:
        n *= d
    return n // blk * size


def expert_bytes(s: Shape, quant: str) -> list[float]:
    """Bytes of one routed expert (its gate + up + down rows) in each MoE layer at this quant mix."""
    per = {i: 0.0 for i in s.moe_layers}
    for name, ne, role, ty in layout(s, quant):
        if role == "matrix" and len(ne) == 3 and "_exps" in name:
            per[int(name.split(".")[1])] += nbytes(ne, ty) / ne[2]
    return [per[i] for i in s.moe_layers]
