"""GGUF as a weight source for the profiler: router and expert tensors read from a (possibly quantized)
GGUF through gguf-py's memory map and dequantizer, one layer at a time, in the Hugging Face layout the
profiler uses. Routing comes from the GGUF's own metadata, as llama.cpp reads it."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .. import LexiError
from .archs import GGUF_ARCHS, MoEModel, Routing
from ..gguf.reader import GGUFModelInfo, field_value, model_info, open_reader
from .weights import LayerWeights

# llama.cpp archs whose builder renormalises the selected weights without a metadata key
_NORM_BY_ARCH = {"llama": True, "mixtral": True, "qwen3moe": True, "granitemoe": True, "qwen2moe": False,
                 "olmoe": False, "gpt-oss": True, "gemma4": True, "qwen35moe": True, "qwen3next": True}


def routing_from_gguf(reader, arch: str) -> Routing:
    def kv(name, default=None):
        v = field_value(reader, f"{arch}.{name}")
        return default if v is None else v
    gating = {1: "softmax", 2: "sigmoid"}.get(int(kv("expert_gating_func", 1)))
    if gating is None:
        raise LexiError(f"{arch}.expert_gating_func = {kv('expert_gating_func')} is not softmax (1) or sigmoid (2); "
                        "lexi-gguf cannot profile this routing")
    norm = kv("expert_weights_norm")
    norm = _NORM_BY_ARCH.get(arch, False) if norm is None else bool(norm)
    groups = int(kv("expert_group_count", 0) or 0)
    spec = GGUF_ARCHS[arch]
    return Routing(gating, norm, float(kv("expert_weights_scale", 0.0) or 1.0),
                   n_group=max(groups, 1), topk_group=int(kv("expert_group_used_count", 0) or 1),
                   group_score="top2sum", has_bias=False,
                   softmax_after_topk=spec.routing({}).softmax_after_topk)


# types whose values bf16 holds within their own rounding error (<= 6 bits a weight; MXFP4 exactly):
# their experts are kept in bf16, half of f32's memory. Q8_0, F16 and F32 stay f32.
_BF16_OK = {"BF16", "MXFP4", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
            "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "IQ4_NL", "TQ1_0", "TQ2_0"}


def dequantize(data: np.ndarray, qt) -> torch.Tensor:
    """One block of a GGUF tensor (a whole tensor, or one expert's [rows, bytes] slice) as torch: f32,
    or bf16 where that loses nothing the quantization had not (_BF16_OK)."""
    import gguf
    if qt == gguf.GGMLQuantizationType.F32:
        return torch.from_numpy(np.array(data))  # copy: the mmap is read-only
    if qt == gguf.GGMLQuantizationType.BF16:
        return torch.from_numpy(np.asarray(data).view(np.int16).copy()).view(torch.bfloat16)
    out = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, qt), dtype=np.float32))
    return out.to(torch.bfloat16) if qt.name in _BF16_OK else out


def tensor_to_torch(t) -> torch.Tensor:
    """A whole GGUF tensor (routers, norms, biases: small) as torch."""
    return dequantize(t.data, t.tensor_type)


class GGUFSource:
    def __init__(self, path):
        self.reader = open_reader(path)
        self.info: GGUFModelInfo = model_info(path, self.reader)
        info = self.info
        if not info.is_moe:
            raise LexiError(f"{path} ({info.arch}) has no MoE layers: this is a dense model, LExI has nothing to adapt")
        spec = GGUF_ARCHS.get(info.arch)
        if spec is None:
            raise LexiError(f"unsupported GGUF architecture {info.arch!r}; lexi-gguf supports: "
                            f"{', '.join(sorted(GGUF_ARCHS))}")
        self.tensors = {t.name: t for t in self.reader.tensors}
        spec = replace(spec, name=spec.name)
        hidden = int(field_value(self.reader, f"{info.arch}.embedding_length"))
        # NextN/MTP blocks (GLM-4.5) sit after the main layers and never run in the main graph: not profiled
        n_main = info.n_main
        eps = field_value(self.reader, f"{info.arch}.attention.layer_norm_rms_epsilon") or 1e-6
        self.model = MoEModel(spec, {"hidden_size": hidden, "rms_norm_eps": float(eps)}, n_main, info.expert_count, info.expert_used_count,
                              tuple(i for i in info.moe_layers if i < n_main), routing_from_gguf(self.reader, info.arch))
        # the expert tensors' types (a K-quant mix keeps some at more bits: Q4_K_M has Q4_K and Q6_K)
        self.types = sorted({self.tensors[f"blk.{i}.{n}.weight"].tensor_type.name for i in info.moe_layers
                             for n in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps")
                             if f"blk.{i}.{n}.weight" in self.tensors})

    def _get(self, name: str, per_expert: bool = False):
        """A tensor as torch, or (per_expert) an [E, ...] expert tensor as E tensors dequantized one expert
        at a time: peak memory is the layer's experts, never an f32 copy of a whole quantized tensor."""
        t = self.tensors.get(name)
        if t is None:
            raise LexiError(f"tensor {name} is missing from {self.info.path}")
        try:
            if per_expert:
                return [dequantize(t.data[e], t.tensor_type) for e in range(t.data.shape[0])]
            return tensor_to_torch(t)
        except NotImplementedError as e:
            raise LexiError(f"{name} is stored as {t.tensor_type.name}, which gguf-py cannot dequantize ({e}); "
                            "profile the safetensors checkpoint instead") from None

    def layer(self, i: int) -> LayerWeights:
        p = f"blk.{i}."
        router = self._get(p + "ffn_gate_inp.weight")                # [E, H]
        bias = self._get(p + "exp_probs_b.bias") if p + "exp_probs_b.bias" in self.tensors else None
        if p + "ffn_gate_up_exps.weight" in self.tensors:
            gu = self._get(p + "ffn_gate_up_exps.weight", per_expert=True)     # E x [2F, H]
            f = gu[0].shape[0] // 2
            gate, up = [x[:f] for x in gu], [x[f:] for x in gu]
        else:
            gate = self._get(p + "ffn_gate_exps.weight", per_expert=True)      # E x [F, H]
            up = self._get(p + "ffn_up_exps.weight", per_expert=True)
        down = self._get(p + "ffn_down_exps.weight", per_expert=True)          # E x [H, F]
        # one dtype for the layer: f32 if any of its tensors needs it (a Q4_K_M layer mixes Q4_K and Q6_K)
        dt = torch.bfloat16 if all(x[0].dtype == torch.bfloat16 for x in (gate, up, down)) else torch.float32
        opt = lambda name: self._get(p + name).float() if p + name in self.tensors else None
        rows = lambda t: None if t is None else list(t)
        lw = LayerWeights(router.float(), bias, [g.to(dt) for g in gate], [u.to(dt) for u in up],
                          [d.to(dt) for d in down], router_bias=opt("ffn_gate_inp.bias"),
                          gate_bias=rows(opt("ffn_gate_exps.bias")), up_bias=rows(opt("ffn_up_exps.bias")),
                          down_bias=rows(opt("ffn_down_exps.bias")))
        if self.info.arch == "gemma4":   # see archs.py: router and experts see their own normed input
            lw.router_norm = opt("ffn_gate_inp.scale") * router.shape[1] ** -0.5
            lw.expert_norm = opt("pre_ffw_norm_2.weight")
            lw.expert_scale = opt("ffn_down_exps.scale")
        return lw

    def norm_weight(self, i: int):
        name = f"blk.{i}.ffn_norm.weight"
        return self._get(name) if name in self.tensors else None
