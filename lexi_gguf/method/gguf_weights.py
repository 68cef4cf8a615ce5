"""GGUF as a weight source for the profiler: router and expert tensors read from a (possibly quantized)
GGUF through gguf-py's memory map and dequantizer, one layer at a time, in the Hugging Face layout the
profiler uses. Routing comes from the GGUF's own metadata, as llama.cpp reads it."""
from __future__ import annotations

import math
from collections.abc import Sequence
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


class Experts(Sequence):
    """The E experts of one GGUF expert tensor ([E, rows, row bytes]), each dequantized by ggml (the runtime's
    own dequantizer, lexi_gguf.runtime.dequant) to f32 when it is read and checked for NaN / Inf there: a
    layer's experts are never all in memory, and the profiler reads each once per chunk of tokens.
    rows: the [lo, hi) output rows to keep (one half of a fused gate_up tensor). `dtype` is what the
    values fit losslessly (bf16 for <= 6-bit types, _BF16_OK), so the profiler may compute in it."""
    checks_on_read = True

    def __init__(self, t, name: str, rows: tuple[int, int] | None = None):
        self.t, self.name, self.rows = t, name, rows
        self.dtype = torch.bfloat16 if t.tensor_type.name in _BF16_OK else torch.float32

    def __len__(self) -> int:
        return int(self.t.data.shape[0])

    def __getitem__(self, e):
        if isinstance(e, slice):
            return [self[i] for i in range(*e.indices(len(self)))]
        from ..runtime.dequant import to_f32
        data = self.t.data[e] if self.rows is None else self.t.data[e][self.rows[0]:self.rows[1]]
        if self.t.tensor_type.name in ("F32", "F16", "BF16"):
            w = dequantize(data, self.t.tensor_type).float()
        else:
            w = torch.from_numpy(to_f32(data, int(self.t.tensor_type), threads=torch.get_num_threads()))
        if not math.isfinite(float(w.sum())):
            raise LexiError(f"{self.name} expert {e} contains NaN or Inf; the file is corrupt, re-download or "
                            "re-quantize it")
        return w

    @property
    def nbytes(self) -> int:
        """Bytes the experts take in memory at `dtype` (without reading them)."""
        rows = self.rows[1] - self.rows[0] if self.rows else int(self.t.data.shape[1])
        cols = int(self.t.shape[0])              # gguf-py lists dimensions innermost first
        return len(self) * rows * cols * (2 if self.dtype == torch.bfloat16 else 4)

    def to(self, device: str) -> list[torch.Tensor]:
        return [w.to(self.dtype).to(device) for w in self]


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

    def _get(self, name: str):
        """A whole (small) tensor as torch: routers, biases, norms."""
        t = self.tensors.get(name)
        if t is None:
            raise LexiError(f"tensor {name} is missing from {self.info.path}")
        try:
            return tensor_to_torch(t)
        except NotImplementedError as e:
            raise LexiError(f"{name} is stored as {t.tensor_type.name}, which gguf-py cannot dequantize ({e}); "
                            "profile the safetensors checkpoint instead") from None

    def _experts(self, name: str, rows: tuple[int, int] | None = None) -> Experts:
        t = self.tensors.get(name)
        if t is None:
            raise LexiError(f"tensor {name} is missing from {self.info.path}")
        return Experts(t, name, rows)

    def layer(self, i: int) -> LayerWeights:
        p = f"blk.{i}."
        router = self._get(p + "ffn_gate_inp.weight")                # [E, H]
        bias = self._get(p + "exp_probs_b.bias") if p + "exp_probs_b.bias" in self.tensors else None
        if p + "ffn_gate_up_exps.weight" in self.tensors:
            name = p + "ffn_gate_up_exps.weight"                     # E x [2F, H], gate rows first
            f = int(self.tensors[name].data.shape[1]) // 2
            gate, up = self._experts(name, (0, f)), self._experts(name, (f, 2 * f))
        else:
            gate = self._experts(p + "ffn_gate_exps.weight")          # E x [F, H]
            up = self._experts(p + "ffn_up_exps.weight")
        down = self._experts(p + "ffn_down_exps.weight")              # E x [H, F]
        # one dtype for the layer: f32 if any of its tensors needs it (a Q4_K_M layer mixes Q4_K and Q6_K)
        dt = torch.bfloat16 if all(x.dtype == torch.bfloat16 for x in (gate, up, down)) else torch.float32
        for x in (gate, up, down):
            x.dtype = dt
        opt = lambda name: self._get(p + name).float() if p + name in self.tensors else None
        rows = lambda t: None if t is None else list(t)
        lw = LayerWeights(router.float(), bias, gate, up, down, router_bias=opt("ffn_gate_inp.bias"),
                          gate_bias=rows(opt("ffn_gate_exps.bias")), up_bias=rows(opt("ffn_up_exps.bias")),
                          down_bias=rows(opt("ffn_down_exps.bias")))
        if self.info.arch == "gemma4":   # see archs.py: router and experts see their own normed input
            lw.router_norm = opt("ffn_gate_inp.scale") * router.shape[1] ** -0.5
            lw.expert_norm = opt("pre_ffw_norm_2.weight")
            lw.expert_scale = opt("ffn_down_exps.scale")
        return lw

    def release(self, i: int) -> None:
        """Unmap block i's expert pages from this process once they are profiled (MADV_DONTNEED on a
        read-only file mapping: the page cache keeps them, RSS drops), so reading a 17 GB file does not
        grow the profiler's resident memory by 17 GB."""
        from ..gguf.pages import release
        for name in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps"):
            t = self.tensors.get(f"blk.{i}.{name}.weight")
            if t is not None:
                release(t.data)

    def norm_weight(self, i: int):
        name = f"blk.{i}.ffn_norm.weight"
        return self._get(name) if name in self.tensors else None
