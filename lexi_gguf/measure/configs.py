"""The three ways to run a model at a budget, as llama.cpp users would compare them:
full (the model's own k), uniform (what users do today: `--override-kv {arch}.expert_used_count=int:K`)
and lexi (the per-layer allocation stored in the file)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import LexiError
from ..runtime.budgets import find_budget
from ..gguf.reader import model_info, read_ladder
from ..runtime.llama import lexi_overrides


@dataclass
class RunConfig:
    config: str                 # full | uniform | lexi
    budget: float
    avg_k: float
    counts: list[int]
    kv: dict = field(default_factory=dict)
    rule: object = None         # a per-token rule (runtime.pertoken.TokenRule) run inside the counts, or None

    @property
    def label(self) -> str:
        if self.rule is not None:
            return self.rule.label
        return "full" if self.config == "full" else f"{self.config} {self.budget:g}"


def uniform_k(budget: float, base: int) -> int:
    """The k every MoE layer runs for uniform reduction at a budget (what --override-kv users set)."""
    return max(1, min(base, round(budget * base)))


def run_configs(path: str | Path, budgets: list[float], custom: list[int] | None = None) -> list[RunConfig]:
    """full, then uniform and lexi at each stored budget; custom: also these counts (one per MoE layer
    or per block), run on the loaded model (config "custom": runtime.set_expert_counts, no kv)."""
    info = model_info(path)
    if not info.is_moe:
        raise LexiError(f"{Path(path).name} has no MoE layers: there is nothing to compare")
    base = info.expert_used_count
    n_moe = len(info.moe_layers)

    def per_layer(k):
        return [k if i in info.moe_layers else 0 for i in range(info.block_count)]

    out = [RunConfig("full", 1.0, float(base), per_layer(base), lexi_overrides(lexi=False))]
    ladder = read_ladder(info)
    for b in budgets:
        row = find_budget(ladder, b, Path(path).name)   # refuses budgets the file does not store
        k_u = uniform_k(b, base)
        out.append(RunConfig("uniform", b, float(k_u), per_layer(k_u), lexi_overrides(info.arch, uniform_k=k_u)))
        counts = row["expert_used_count"]
        out.append(RunConfig("lexi", b, sum(counts) / n_moe, counts, lexi_overrides(budget_index=row["index"])))
    if custom:
        from ..runtime.budgets import custom as as_budget
        counts = as_budget(info, custom).counts
        avg = sum(counts) / n_moe
        out.append(RunConfig("custom", avg / base, avg, counts, {}))
    return out
