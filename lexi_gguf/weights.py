"""Weight sources for the profiler: one MoE layer at a time, never the whole model.

SafetensorsSource reads a Hugging Face checkpoint (single file or sharded with
model.safetensors.index.json) through safetensors' mmap. GGUFSource (lexi_gguf.gguf_source) reads
the same tensors from a GGUF. Both yield LayerWeights in the Hugging Face [out, in] layout.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import LexiError
from .archs import FUSED_HF, MoEModel, resolve


@dataclass
class LayerWeights:
    router: torch.Tensor                 # [E, H]
    bias: torch.Tensor | None            # [E] selection bias
    gate: list[torch.Tensor]             # E x [F, H]
    up: list[torch.Tensor]               # E x [F, H]
    down: list[torch.Tensor]             # E x [H, F]

    @property
    def dtype(self) -> torch.dtype:
        return self.gate[0].dtype

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.gate, *self.up, *self.down))

    def check_finite(self, where: str) -> None:
        for name, ts in (("router", [self.router]), ("gate", self.gate), ("up", self.up), ("down", self.down)):
            for e, t in enumerate(ts):
                if not torch.isfinite(t).all():
                    raise LexiError(f"{where}: {name} weights (expert {e}) contain NaN or Inf; "
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
        missing = sorted({f for f in self.weight_map.values() if not (self.dir / f).exists()})
        if missing:
            raise LexiError(f"checkpoint shard(s) missing: {', '.join(missing)} (listed in "
                            f"model.safetensors.index.json); download the complete checkpoint")

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
            return self._open(self.weight_map[name]).get_tensor(name)
        except LexiError:
            raise
        except Exception as e:
            raise LexiError(f"cannot read tensor {name} from {self.weight_map[name]}: {e}; "
                            "the file is truncated or corrupt, re-download it") from None

    def layer(self, i: int) -> LayerWeights:
        m = self.model
        p = m.prefix(i) + "."
        spec = m.spec
        router = self.get(p + spec.router)
        bias = self.get(p + spec.bias) if spec.bias and self.has(p + spec.bias) else None
        fused_hf = self.has(p + FUSED_HF["gate_up"])
        if spec.fused or fused_hf:
            names = {"gate_up": spec.experts["gate_up"], "down": spec.experts["down"]} if spec.fused else FUSED_HF
            gu, down = self.get(p + names["gate_up"]), self.get(p + names["down"])
            f = gu.shape[1] // 2
            gate = [gu[e, :f] for e in range(m.n_expert)]
            up = [gu[e, f:] for e in range(m.n_expert)]
            downs = [down[e] for e in range(m.n_expert)]
        else:
            gate = [self.get(p + spec.experts["gate"].format(e=e)) for e in range(m.n_expert)]
            up = [self.get(p + spec.experts["up"].format(e=e)) for e in range(m.n_expert)]
            downs = [self.get(p + spec.experts["down"].format(e=e)) for e in range(m.n_expert)]
        lw = LayerWeights(router, bias, gate, up, downs)
        if lw.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise LexiError(f"layer {i}: expert weights are {lw.dtype}; lexi-gguf reads bf16, f16 and f32 checkpoints")
        return lw

    def norm_weight(self, i: int) -> torch.Tensor | None:
        """The RMSNorm weight in front of layer i's MoE block (for --input rmsnorm)."""
        name = f"model.layers.{i}.post_attention_layernorm.weight"
        return self.get(name) if self.has(name) else None
