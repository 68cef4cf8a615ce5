"""MoE architectures described as data: where the router and experts live in a Hugging Face
checkpoint, how tokens are routed, and which layers are dense.

Routing follows what llama.cpp's build_moe_ffn computes for the same GGUF arch, so the profile
measures the deviation the runtime will actually see.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import LexiError


@dataclass(frozen=True)
class Routing:
    gating: str            # "softmax" | "sigmoid"
    norm_topk: bool        # renormalise the selected weights to sum 1
    scale: float = 1.0     # routed scaling factor applied to the weights
    n_group: int = 1       # expert groups (DeepSeek-V3 style group-limited routing)
    topk_group: int = 1    # groups kept per token
    group_score: str = "max"  # "max" (DeepSeek-V2 group_limited_greedy) | "top2sum" (V3 noaux_tc)
    has_bias: bool = False    # selection bias (e_score_correction_bias), selection only


@dataclass(frozen=True)
class ArchSpec:
    name: str                      # HF model_type
    gguf_arch: str                 # llama.cpp arch name the converter writes
    moe_prefix: str                # per layer, e.g. "model.layers.{i}.mlp"
    router: str                    # under moe_prefix
    experts: dict[str, str]        # per-expert names ({e} = expert) or fused 3-D names, under moe_prefix
    fused: bool = False            # experts are 3-D tensors [E, out, in]; "gate_up" is gate then up
    n_expert_key: tuple[str, ...] = ("num_experts", "num_local_experts")  # transformers 5 renames some
    k_key: str = "num_experts_per_tok"
    bias: str | None = None        # selection bias tensor under moe_prefix
    routing: Callable[[dict], Routing] = field(default=lambda cfg: Routing("softmax", False))
    is_moe_layer: Callable[[dict, int], bool] = field(default=lambda cfg, i: True)
    # transformers module that holds top_k for that layer (used by tests/reference)
    hf_moe_attr: str = "mlp"


PER_EXPERT = {"gate": "experts.{e}.gate_proj.weight", "up": "experts.{e}.up_proj.weight",
              "down": "experts.{e}.down_proj.weight"}


def _qwen_moe_layer(cfg: dict, i: int) -> bool:
    if i in (cfg.get("mlp_only_layers") or []):
        return False
    step = cfg.get("decoder_sparse_step", 1) or 1
    return (i + 1) % step == 0


def _deepseek_moe_layer(cfg: dict, i: int) -> bool:
    return (cfg.get("n_routed_experts") is not None and i >= cfg.get("first_k_dense_replace", 0)
            and i % (cfg.get("moe_layer_freq", 1) or 1) == 0)


def _deepseek_v2_routing(cfg: dict) -> Routing:
    grouped = cfg.get("topk_method", "greedy") == "group_limited_greedy"
    return Routing(cfg.get("scoring_func", "softmax"), bool(cfg.get("norm_topk_prob", False)),
                   float(cfg.get("routed_scaling_factor", 1.0)),
                   n_group=int(cfg.get("n_group") or 1) if grouped else 1,
                   topk_group=int(cfg.get("topk_group") or 1) if grouped else 1, group_score="max")


def _deepseek_v3_routing(cfg: dict) -> Routing:
    return Routing(cfg.get("scoring_func", "sigmoid"), bool(cfg.get("norm_topk_prob", True)),
                   float(cfg.get("routed_scaling_factor", 1.0)), n_group=int(cfg.get("n_group") or 1),
                   topk_group=int(cfg.get("topk_group") or 1), group_score="top2sum", has_bias=True)


ARCHS: dict[str, ArchSpec] = {a.name: a for a in [
    ArchSpec("mixtral", "llama", "model.layers.{i}.block_sparse_moe", "gate.weight",
             {"gate": "experts.{e}.w1.weight", "up": "experts.{e}.w3.weight", "down": "experts.{e}.w2.weight"},
             n_expert_key=("num_local_experts",), routing=lambda cfg: Routing("softmax", True)),
    ArchSpec("qwen2_moe", "qwen2moe", "model.layers.{i}.mlp", "gate.weight", PER_EXPERT,
             routing=lambda cfg: Routing("softmax", bool(cfg.get("norm_topk_prob", False))),
             is_moe_layer=_qwen_moe_layer),
    ArchSpec("qwen3_moe", "qwen3moe", "model.layers.{i}.mlp", "gate.weight", PER_EXPERT,
             routing=lambda cfg: Routing("softmax", bool(cfg.get("norm_topk_prob", True))),
             is_moe_layer=_qwen_moe_layer),
    ArchSpec("olmoe", "olmoe", "model.layers.{i}.mlp", "gate.weight", PER_EXPERT,
             routing=lambda cfg: Routing("softmax", bool(cfg.get("norm_topk_prob", False)))),
    ArchSpec("deepseek_v2", "deepseek2", "model.layers.{i}.mlp", "gate.weight", PER_EXPERT,
             n_expert_key=("n_routed_experts",), routing=_deepseek_v2_routing, is_moe_layer=_deepseek_moe_layer),
    ArchSpec("deepseek_v3", "deepseek2", "model.layers.{i}.mlp", "gate.weight", PER_EXPERT,
             n_expert_key=("n_routed_experts",), bias="gate.e_score_correction_bias",
             routing=_deepseek_v3_routing, is_moe_layer=_deepseek_moe_layer),
    ArchSpec("granitemoe", "granitemoe", "model.layers.{i}.block_sparse_moe", "router.layer.weight",
             {"gate_up": "input_linear.weight", "down": "output_linear.weight"}, fused=True,
             n_expert_key=("num_local_experts",), routing=lambda cfg: Routing("softmax", True),
             hf_moe_attr="block_sparse_moe"),
]}

# transformers >= 5 can also store experts fused as 3-D tensors under these names
FUSED_HF = {"gate_up": "experts.gate_up_proj", "down": "experts.down_proj"}


@dataclass(frozen=True)
class MoEModel:
    """An architecture bound to one config: what the profiler needs to know about the model."""
    spec: ArchSpec
    config: dict
    n_layer: int
    n_expert: int
    k_base: int
    moe_layers: tuple[int, ...]
    routing: Routing

    def prefix(self, i: int) -> str:
        return self.spec.moe_prefix.format(i=i)


def supported() -> str:
    return ", ".join(sorted(ARCHS))


def resolve(config: dict) -> MoEModel:
    """Bind a HF config.json dict to its architecture; clear errors for dense or unknown models."""
    mt = config.get("model_type")
    if mt not in ARCHS:
        raise LexiError(f"unsupported architecture {mt!r} (model_type in config.json); "
                        f"lexi-gguf supports: {supported()}")
    spec = ARCHS[mt]
    n_expert = next((config[k] for k in spec.n_expert_key if config.get(k)), 0) or 0
    k_base = int(config.get(spec.k_key) or 0)
    n_layer = int(config["num_hidden_layers"])
    moe_layers = tuple(i for i in range(n_layer) if n_expert > 0 and spec.is_moe_layer(config, i))
    if n_expert <= 1 or k_base < 1 or not moe_layers:
        raise LexiError(f"{mt} config has no MoE layers (experts={n_expert}, experts per token={k_base}): "
                        "this is a dense model, LExI has nothing to adapt")
    if k_base > n_expert:
        raise LexiError(f"config says {k_base} experts per token but only {n_expert} experts exist")
    return MoEModel(spec, config, n_layer, int(n_expert), k_base, moe_layers, spec.routing(config))
