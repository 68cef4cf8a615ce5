"""Weight sources for the profiler: one MoE layer at a time, never the whole model.

SafetensorsSource reads a Hugging Face checkpoint (single file or sharded with
model.safetensors.index.json) through safetensors' mmap. GGUFSource (lexi_gguf.method.gguf_weights) reads
the same tensors from a GGUF. Both yield LayerWeights in the Hugging Face [out, in] layout.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import LexiError
from .archs import FUSED_HF, MoEModel, resolve


@dataclass
class LayerWeights:
    router: torch.Tensor                 # [E, H]
    bias: torch.Tensor | None            # [E] selection bias
    gate: list[torch.Tensor] | None      # E x [F, H]; None when experts are not gated
    up: list[torch.Tensor]               # E x [F, H]
    down: list[torch.Tensor]             # E x [H, F]
    router_bias: torch.Tensor | None = None     # [E] added to the router logits
    gate_bias: list[torch.Tensor] | None = None  # E x [F]
    up_bias: list[torch.Tensor] | None = None    # E x [F]
    down_bias: list[torch.Tensor] | None = None  # E x [H]
    expert_scale: torch.Tensor | None = None     # [E] per-expert output scale (Gemma 4)
    router_norm: torch.Tensor | None = None      # [H] router input = rmsnorm(x) * router_norm (Gemma 4)
    expert_norm: torch.Tensor | None = None      # [H] expert input = rmsnorm(x) * expert_norm (Gemma 4)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the experts hold their values in (a lazily read source says it without reading)."""
        return getattr(self.up, "dtype", None) or self.up[0].dtype

    def fields(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def to(self, device: str) -> "LayerWeights":
        move = lambda t: None if t is None else [x.to(device) for x in t] if isinstance(t, list) else t.to(device)
        # a lazily read expert sequence (gguf_weights.Experts) moves as a list: .to reads every expert
        return LayerWeights(**{k: move(v) for k, v in self.fields().items()})

    def nbytes(self) -> int:
        def size(ts):
            return ts.nbytes if hasattr(ts, "nbytes") else sum(t.numel() * t.element_size() for t in ts)
        return sum(size(ts) for ts in (self.gate or [], self.up, self.down))

    def check_finite(self, where: str) -> None:
        for name, ts in self.fields().items():
            if ts is None or getattr(ts, "checks_on_read", False):   # checked as each expert is read
                continue
            for e, t in enumerate(ts if isinstance(ts, list) else [ts]):
                if not torch.isfinite(t).all():
                    what = f"{name} weights (expert {e})" if isinstance(ts, list) else f"{name} weights"
                    raise LexiError(f"{where}: {what} contain NaN or Inf; "
                                    "the checkpoint is corrupt, re-download or re-export it")


def load_config(model_dir: Path) -> dict:
    cfg_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise LexiError(f"{model_dir} is not a directory; pass a Hugging Face checkpoint folder")
    if not cfg_path.exists():
        raise LexiError(f"{cfg_path} not found; pass a Hugging Face checkpoint folder with config.json")
    cfg = json.loads(cfg_path.read_text())
    # multimodal / nested configs keep the language model under text_config
    if "text_config" in cfg and "num_hidden_layers" not in cfg:
        return cfg["text_config"]
    return cfg


# OCP MX FP4 (E2M1) code points, as in the gpt-oss checkpoints and transformers' dequantiser
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """One expert's MXFP4 tensor: blocks [out, G, 16] uint8 (two E2M1 values a byte, low nibble first),
    scales [out, G] uint8 (E8M0, bias 127) -> [out, G * 32] bfloat16. Lossless: an E2M1 value times a
    power of two needs 3 mantissa bits and bf16's 8-bit exponent; half of f32's memory, so a layer of
    gpt-oss-20b's 32 experts takes ~1.6 GB."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    b = blocks.to(torch.uint8)
    out = torch.empty(*b.shape[:-1], b.shape[-1] * 2, dtype=torch.float32)
    out[..., 0::2] = lut[(b & 0x0F).long()]
    out[..., 1::2] = lut[(b >> 4).long()]
    out = torch.ldexp(out, scales.to(torch.int32)[..., None] - 127)
    return out.reshape(out.shape[0], -1).to(torch.bfloat16)


FP8_TYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequant_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """A block-scaled FP8 weight (DeepSeek-V3 / Kimi-K2 releases: `weight` float8_e4m3fn [out, in],
    `weight_scale_inv` f32 [ceil(out/b0), ceil(in/b1)], each block's values times its scale) -> bf16.
    The product is formed in f32 as the pinned converter's dequant_simple forms it, then rounded once."""
    s = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    s = s[: weight.shape[0], : weight.shape[1]]
    return (weight.float() * s).to(torch.bfloat16)


def _split_gate_up(t: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """gate and up halves of a fused [2F, ...] tensor: first/second half, or even/odd rows."""
    if how == "interleave":
        return t[0::2], t[1::2]
    f = t.shape[0] // 2
    return t[:f], t[f:]


class SafetensorsSource:
    def __init__(self, model_dir: str | Path):
        from safetensors import safe_open
        self._safe_open = safe_open
        self._handles: dict[str, object] = {}   # one open mmap per shard
        self.dir = Path(model_dir)
        self.config = load_config(self.dir)
        self.model: MoEModel = resolve(self.config)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise LexiError(f"no *.safetensors files in {self.dir}; lexi-gguf reads safetensors checkpoints")
            self.weight_map = {}
            for f in files:
                for k in self._open(f.name).keys():
                    self.weight_map[k] = f.name
        self.layer_root = "model.layers."
        if not any(k.startswith("model.layers.") for k in self.weight_map):
            self.layer_root = next((r for r in ("model.language_model.layers.", "language_model.model.layers.")
                                    if any(k.startswith(r) for k in self.weight_map)), "model.layers.")
        missing = sorted({f for f in self.weight_map.values() if not (self.dir / f).exists()})
        if missing:
            raise LexiError(f"checkpoint shard(s) missing: {', '.join(missing)} (listed in "
                            f"model.safetensors.index.json); download the complete checkpoint")

    def n_params(self) -> int:
        """Parameters in the checkpoint, from the shards' headers (packed MXFP4 blocks: two a byte)."""
        n = 0
        for name, fname in self.weight_map.items():
            shape = self._open(fname).get_slice(name).get_shape()
            count = 1
            for d in shape:
                count *= int(d)
            n += 2 * count if name.endswith("_blocks") else count
        return n

    def _open(self, fname: str):
        h = self._handles.get(fname)
        if h is None:
            try:
                h = self._safe_open(str(self.dir / fname), framework="pt")
            except Exception as e:  # safetensors raises its own error types for truncated headers
                raise LexiError(f"cannot read {self.dir / fname}: {e}; the file is truncated or corrupt, "
                                "re-download it") from None
            self._handles[fname] = h
        return h

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise LexiError(f"tensor {name} not found in {self.dir}; the checkpoint does not match its "
                            f"config ({self.model.spec.name})")
        try:
            t = self._open(self.weight_map[name]).get_tensor(name)
        except LexiError:
            raise
        except Exception as e:
            raise LexiError(f"cannot read tensor {name} from {self.weight_map[name]}: {e}; "
                            "the file is truncated or corrupt, re-download it") from None
        if t.dtype in FP8_TYPES:      # one tensor (one expert) at a time, scales applied
            if not self.has(name + "_scale_inv"):
                raise LexiError(f"{name} is FP8 but {name}_scale_inv is missing; the checkpoint is incomplete")
            block = tuple((self.config.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
            t = dequant_fp8(t, self.get(name + "_scale_inv"), block)
        return t

    def prefix(self, i: int) -> str:
        """Layer i's MoE prefix; multimodal checkpoints keep the text model under model.language_model."""
        return self.model.prefix(i).replace("model.layers.", self.layer_root, 1) + "."

    def _expert_tensor(self, p: str, name: str) -> list[torch.Tensor] | None:
        """A fused [E, ...] tensor as E per-expert [out, in] tensors (MXFP4 dequantised one expert at a time)."""
        ex = self.model.spec.experts
        if self.has(p + name):
            t = self.get(p + name)
            return [t[e].T if ex.layout == "in_out" else t[e] for e in range(t.shape[0])]
        if self.has(p + name + "_blocks"):
            blocks, scales = self.get(p + name + "_blocks"), self.get(p + name + "_scales")
            return [dequant_mxfp4(blocks[e], scales[e]) for e in range(blocks.shape[0])]
        return None

    def layer(self, i: int) -> LayerWeights:
        m = self.model
        p = self.prefix(i)
        spec = m.spec
        ex = spec.experts
        router = self.get(p + spec.router)
        bias = self.get(p + spec.bias) if spec.bias and self.has(p + spec.bias) else None
        router_bias = self.get(p + spec.router_bias) if spec.router_bias else None
        gate_bias = up_bias = down_bias = None
        names = ex.names if ex.fused else FUSED_HF
        gu = self._expert_tensor(p, names["gate_up"]) if ex.gated else None
        if ex.fused or gu is not None:
            downs = self._expert_tensor(p, names["down"])
            if gu is None or downs is None:
                raise LexiError(f"layer {i}: expert tensors {p}{names['gate_up']} / {names['down']} not found in "
                                f"{self.dir}; the checkpoint does not match its config ({spec.name})")
            gate, up = (list(x) for x in zip(*(_split_gate_up(t, ex.gate_up) for t in gu)))
            if ex.bias:
                b = self.get(p + ex.bias["gate_up"])
                gate_bias, up_bias = zip(*(_split_gate_up(b[e], ex.gate_up) for e in range(m.n_expert)))
                gate_bias, up_bias = list(gate_bias), list(up_bias)
                db = self.get(p + ex.bias["down"])
                down_bias = [db[e] for e in range(m.n_expert)]
        else:
            gate = [self.get(p + ex.names["gate"].format(e=e)) for e in range(m.n_expert)] if ex.gated else None
            up = [self.get(p + ex.names["up"].format(e=e)) for e in range(m.n_expert)]
            downs = [self.get(p + ex.names["down"].format(e=e)) for e in range(m.n_expert)]
        opt = lambda name: self.get(p + name) if name else None
        router_norm = opt(spec.router_norm)
        if router_norm is not None:   # Gemma 4 scales the normalised router input by hidden^-0.5
            router_norm = router_norm.float() * router_norm.shape[0] ** -0.5
        lw = LayerWeights(router, bias, gate, up, downs, router_bias, gate_bias, up_bias, down_bias,
                          opt(spec.expert_scale), router_norm, opt(spec.expert_norm))
        if lw.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise LexiError(f"layer {i}: expert weights are {lw.dtype}; lexi-gguf reads bf16, f16, f32, FP8 (block-scaled) "
                            "and MXFP4 checkpoints")
        return lw

    def norm_weight(self, i: int) -> torch.Tensor | None:
        """The RMSNorm weight in front of layer i's MoE block (for --input rmsnorm)."""
        name = f"{self.layer_root}{i}.post_attention_layernorm.weight"
        return self.get(name) if self.has(name) else None
