"""MoE architectures described as data: where the router and experts live in a Hugging Face
checkpoint, how tokens are routed, and which layers are dense.

Routing follows what llama.cpp's build_moe_ffn computes for the same GGUF arch, so the profile
measures the deviation the runtime will actually see.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .. import LexiError


@dataclass(frozen=True)
class Routing:
    gating: str            # "softmax" | "sigmoid"
    norm_topk: bool        # renormalise the selected weights to sum 1
    scale: float = 1.0     # routed scaling factor applied to the weights
    n_group: int = 1       # expert groups (DeepSeek-V3 style group-limited routing)
    topk_group: int = 1    # groups kept per token
    group_score: str = "max"  # "max" (DeepSeek-V2 group_limited_greedy) | "top2sum" (V3 noaux_tc)
    has_bias: bool = False    # selection bias (e_score_correction_bias), selection only
    # softmax over the selected logits only (gpt-oss): the weights always sum to 1, whatever
    # lexi.weight_norm says (llama.cpp's SOFTMAX_WEIGHT gating)
    softmax_after_topk: bool = False


@dataclass(frozen=True)
class Experts:
    """How one layer's experts are stored and what each computes.

    Per-expert tensors are [out, in] (torch Linear). Fused 3-D tensors are [E, out, in] ("out_in") or
    [E, in, out] ("in_out", gpt-oss); a fused gate_up holds gate then up ("concat") or alternating
    rows ("interleave", gpt-oss). MXFP4 checkpoints (gpt-oss) store `<name>_blocks` / `<name>_scales`."""
    names: dict[str, str]              # gate/up/down per expert ({e}), or gate_up/down fused, under moe_prefix
    fused: bool = False
    layout: str = "out_in"
    gate_up: str = "concat"
    bias: dict[str, str] | None = None  # fused expert biases: gate_up [E, 2F], down [E, H]
    # "silu" (SwiGLU), "gelu_tanh" (GeGLU), "swiglu_oai" (gpt-oss clamped), "relu2" (non-gated)
    activation: str = "silu"

    @property
    def gated(self) -> bool:
        return self.activation != "relu2"


@dataclass(frozen=True)
class ArchSpec:
    name: str                      # HF model_type
    gguf_arch: str                 # llama.cpp arch name the converter writes
    moe_prefix: str                # per layer, e.g. "model.layers.{i}.mlp"
    router: str                    # under moe_prefix
    experts: Experts
    n_expert_key: tuple[str, ...] = ("num_experts", "num_local_experts")  # transformers 5 renames some
    k_key: str = "num_experts_per_tok"
    bias: str | None = None        # selection bias tensor under moe_prefix
    router_bias: str | None = None  # bias added to the router logits (gpt-oss), under moe_prefix
    # Gemma 4: the router and the experts see differently normalised copies of the block input
    router_norm: str | None = None   # router input = rmsnorm(x) * this * hidden^-0.5
    expert_norm: str | None = None   # expert input = rmsnorm(x) * this
    expert_scale: str | None = None  # [E] per-expert scale on each selected expert's output
    routing: Callable[[dict], Routing] = field(default=lambda cfg: Routing("softmax", False))
    is_moe_layer: Callable[[dict, int], bool] = field(default=lambda cfg, i: True)
    # transformers module that holds top_k for that layer (used by tests/reference)
    hf_moe_attr: str = "mlp"
    aliases: tuple[str, ...] = ()  # other model_types with the same text model (multimodal wrappers)
    # the converter expects multi-token-prediction tensors under this prefix unless told --no-mtp
    mtp_prefix: str | None = None
    checkpoints: tuple[str, ...] = ()  # released checkpoints a user would download (docs)


PER_EXPERT = Experts({"gate": "experts.{e}.gate_proj.weight", "up": "experts.{e}.up_proj.weight",
                      "down": "experts.{e}.down_proj.weight"})


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


def _first_dense(cfg: dict, i: int) -> bool:
    return i >= int(cfg.get("first_k_dense_replace") or 0)


def _sigmoid_grouped_routing(cfg: dict) -> Routing:
    """DeepSeek-V3 noaux_tc routing, shared by GLM-4.5 and others: sigmoid scores, a selection-only
    correction bias, group-limited selection by the sum of each group's top 2."""
    return Routing(cfg.get("scoring_func", "sigmoid"), bool(cfg.get("norm_topk_prob", True)),
                   float(cfg.get("routed_scaling_factor", 1.0)), n_group=int(cfg.get("n_group") or 1),
                   topk_group=int(cfg.get("topk_group") or 1), group_score="top2sum", has_bias=True)


MIXTRAL_EXPERTS = Experts({"gate": "experts.{e}.w1.weight", "up": "experts.{e}.w3.weight",
                           "down": "experts.{e}.w2.weight"})
GPT_OSS_EXPERTS = Experts({"gate_up": "experts.gate_up_proj", "down": "experts.down_proj"}, fused=True,
                          layout="in_out", gate_up="interleave", activation="swiglu_oai",
                          bias={"gate_up": "experts.gate_up_proj_bias", "down": "experts.down_proj_bias"})

ARCHS: dict[str, ArchSpec] = {a.name: a for a in [
    ArchSpec("mixtral", "llama", "model.layers.{i}.block_sparse_moe", "gate.weight", MIXTRAL_EXPERTS,
             n_expert_key=("num_local_experts",), routing=lambda cfg: Routing("softmax", True),
             checkpoints=("mistralai/Mixtral-8x7B-Instruct-v0.1",)),
    ArchSpec("qwen2_moe", "qwen2moe", "model.layers.{i}.mlp", "gate.weight", PER_EXPERT,
             routing=lambda cfg: Routing("softmax", bool(cfg.get("norm_topk_prob", False))),
             is_moe_layer=_qwen_moe_layer, checkpoints=("Qwen/Qwen1.5-MoE-A2.7B-Chat",)),
    ArchSpec("qwen3_moe", "qwen3moe", "model.layers.{i}.mlp", "gate.weight", PER_EXPERT,
             routing=lambda cfg: Routing("softmax", bool(cfg.get("norm_topk_prob", True))),
             is_moe_layer=_qwen_moe_layer, checkpoints=("Qwen/Qwen3-30B-A3B-Instruct-2507", "Qwen/Qwen3-Coder-30B-A3B-Instruct")),
    ArchSpec("olmoe", "olmoe", "model.layers.{i}.mlp", "gate.weight", PER_EXPERT,
             routing=lambda cfg: Routing("softmax", bool(cfg.get("norm_topk_prob", False))),
             checkpoints=("allenai/OLMoE-1B-7B-0125-Instruct",)),
    ArchSpec("deepseek_v2", "deepseek2", "model.layers.{i}.mlp", "gate.weight", PER_EXPERT,
             n_expert_key=("n_routed_experts",), routing=_deepseek_v2_routing, is_moe_layer=_deepseek_moe_layer,
             checkpoints=("deepseek-ai/DeepSeek-V2-Lite-Chat",)),
    ArchSpec("deepseek_v3", "deepseek2", "model.layers.{i}.mlp", "gate.weight", PER_EXPERT,
             n_expert_key=("n_routed_experts",), bias="gate.e_score_correction_bias",
             routing=_sigmoid_grouped_routing, is_moe_layer=_deepseek_moe_layer,
             checkpoints=("deepseek-ai/DeepSeek-V3.1", "moonshotai/Kimi-K2-Instruct")),
    ArchSpec("granitemoe", "granitemoe", "model.layers.{i}.block_sparse_moe", "router.layer.weight",
             Experts({"gate_up": "input_linear.weight", "down": "output_linear.weight"}, fused=True),
             n_expert_key=("num_local_experts",), routing=lambda cfg: Routing("softmax", True),
             hf_moe_attr="block_sparse_moe", checkpoints=("ibm-granite/granite-3.1-3b-a800m-instruct",)),
    ArchSpec("gpt_oss", "gpt-oss", "model.layers.{i}.mlp", "router.weight", GPT_OSS_EXPERTS,
             n_expert_key=("num_local_experts",), router_bias="router.bias",
             routing=lambda cfg: Routing("softmax", True, softmax_after_topk=True),
             checkpoints=("openai/gpt-oss-20b", "openai/gpt-oss-120b")),
    ArchSpec("gemma4_text", "gemma4", "model.layers.{i}", "router.proj.weight",
             Experts({"gate_up": "experts.gate_up_proj", "down": "experts.down_proj"}, fused=True,
                     activation="gelu_tanh"),
             k_key="top_k_experts", routing=lambda cfg: Routing("softmax", True),
             is_moe_layer=lambda cfg, i: bool(cfg.get("enable_moe_block")), router_norm="router.scale",
             expert_norm="pre_feedforward_layernorm_2.weight", expert_scale="router.per_expert_scale",
             hf_moe_attr="", aliases=("gemma4",), checkpoints=("google/gemma-4-26B-A4B-it",)),
    # hybrid (Gated DeltaNet linear attention) models; the shared expert's sigmoid gate does not depend on k
    ArchSpec("qwen3_5_moe_text", "qwen35moe", "model.layers.{i}.mlp", "gate.weight", PER_EXPERT,
             routing=lambda cfg: Routing("softmax", True), aliases=("qwen3_5_moe",), mtp_prefix="mtp.",
             checkpoints=("Qwen/Qwen3.5-35B-A3B", "Qwen/Qwen3.5-122B-A10B")),
    ArchSpec("qwen3_next", "qwen3next", "model.layers.{i}.mlp", "gate.weight", PER_EXPERT,
             routing=lambda cfg: Routing("softmax", True), is_moe_layer=_qwen_moe_layer, mtp_prefix="mtp.",
             checkpoints=("Qwen/Qwen3-Next-80B-A3B-Instruct",)),
    ArchSpec("glm4_moe", "glm4moe", "model.layers.{i}.mlp", "gate.weight", PER_EXPERT,
             n_expert_key=("n_routed_experts",), bias="gate.e_score_correction_bias",
             routing=_sigmoid_grouped_routing, is_moe_layer=_first_dense, aliases=("glm4v_moe",),
             checkpoints=("zai-org/GLM-4.5-Air", "zai-org/GLM-4.6")),
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


# llama.cpp arch name -> the first registered spec that converts to it (GGUF files name only that)
GGUF_ARCHS: dict[str, ArchSpec] = {}
for _spec in ARCHS.values():
    GGUF_ARCHS.setdefault(_spec.gguf_arch, _spec)


def spec_for(model_type: str | None) -> ArchSpec | None:
    if model_type in ARCHS:
        return ARCHS[model_type]
    return next((a for a in ARCHS.values() if model_type in a.aliases), None)


def resolve(config: dict) -> MoEModel:
    """Bind a HF config.json dict to its architecture; clear errors for dense or unknown models."""
    mt = config.get("model_type")
    spec = spec_for(mt)
    n_expert = next((config[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if config.get(k)), 0)
    if config.get("num_experts_per_tok") == 1 and (n_expert or 0) > 1:   # e.g. Llama 4 Scout/Maverick
        raise LexiError(f"{mt} routes each token to 1 expert (experts per token = 1): there is no smaller k "
                        "to give a layer, LExI has nothing to lower")
    if spec is None:
        raise LexiError(f"unsupported architecture {mt!r} (model_type in config.json); "
                        f"lexi-gguf supports: {supported()}")
    n_expert = next((config[k] for k in spec.n_expert_key if config.get(k)), 0) or 0
    k_base = int(config.get(spec.k_key) or 0)
    n_layer = int(config["num_hidden_layers"])
    moe_layers = tuple(i for i in range(n_layer) if n_expert > 0 and spec.is_moe_layer(config, i))
    if n_expert <= 1 or k_base < 1 or not moe_layers:
        raise LexiError(f"{mt} config has no MoE layers (experts={n_expert}, experts per token={k_base}): "
                        "this is a dense model, LExI has nothing to adapt")
    if k_base > n_expert:
        raise LexiError(f"config says {k_base} experts per token but only {n_expert} experts exist")
    if k_base == 1:
        raise LexiError(f"{mt} routes each token to 1 expert (experts per token = 1): there is no smaller k "
                        "to give a layer, LExI has nothing to lower")
    return MoEModel(spec, config, n_layer, int(n_expert), k_base, moe_layers, spec.routing(config))
