"""Budgets by name: what a user types (`0.75`, `full`, nothing) -> the ladder row the runtime runs.

Names: a stored budget fraction (`0.5`) is that row of lexi.ladder.expert_used_count; `full` is the
model's own k in every layer (lexi off); `default` is what the file (or the load-time override) chose;
`k=8,6,...` is any per-layer counts (one per MoE layer, or one per block with 0 on dense blocks), run
on the loaded model without a row in the file (runtime.set_expert_counts).
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import LexiError
from ..gguf import keys
from ..gguf.reader import read_ladder
from .llama import ROW_CUSTOM, ROW_LOADED, ROW_MODEL, set_expert_counts, set_lexi_row

FULL, DEFAULT = "full", "default"
COUNTS = "k="          # a budget spec of counts: k=8,6,...


def find_budget(rows: list[dict], budget: float, name: str) -> dict:
    """The ladder row of a stored budget; a budget that is not stored is an error listing those that are."""
    for r in rows:
        if abs(r["budget"] - budget) < 1e-3:
            return r
    have = ", ".join(f"{r['budget']:g}" for r in rows) or "none"
    raise LexiError(f"budget {budget:g} is not stored in {name} (stored budgets: {have}); "
                    "pick one of those or rewrite the file with `lexi-gguf apply --budgets ...`")


@dataclass(frozen=True)
class Budget:
    name: str          # "full", "default" or the fraction as typed back ("0.75")
    row: int           # for runtime.set_lexi_row
    counts: list[int]  # experts per block (0 = dense)


def budget_kv(b: Budget) -> dict:
    """The load-time kv overrides that make a fresh context run this budget (what set_lexi_row does
    to a loaded one): for llama.cpp's tools, which take one budget per process."""
    if b.row == ROW_CUSTOM:
        raise LexiError(f"{b.name}: llama.cpp's tools take the counts stored in the file, not any counts; write "
                        "them in with `lexi-gguf apply --k ...` (or use the python engine)")
    if b.row == ROW_LOADED:
        return {}
    if b.row == ROW_MODEL:
        return {keys.ENABLE: False}
    return {keys.BUDGET_INDEX: b.row}


def budgets(info, ladder: list[dict] | None = None) -> dict[str, Budget]:
    """Every budget a loaded file can switch to, by name: default, full, then the stored fractions."""
    base = info.base_counts
    lx = info.lexi
    default = [int(x) for x in lx[keys.EXPERT_USED_COUNT]] if keys.EXPERT_USED_COUNT in lx else base
    out = {DEFAULT: Budget(DEFAULT, ROW_LOADED, default), FULL: Budget(FULL, ROW_MODEL, base)}
    for r in read_ladder(info) if ladder is None else ladder:
        out[f"{r['budget']:g}"] = Budget(f"{r['budget']:g}", r["index"], r["expert_used_count"])
    return out


def custom(info, counts: list[int]) -> Budget:
    """Any counts as a budget: one per MoE layer, or one per block (0 on dense blocks); each 1..n_expert."""
    moe = list(info.moe_layers)
    ks = [int(k) for k in counts]
    if len(ks) == len(moe) and len(moe) != info.block_count:
        ks = [ks[moe.index(i)] if i in moe else 0 for i in range(info.block_count)]
    if len(ks) != info.block_count:
        raise LexiError(f"{len(ks)} counts: give one per MoE layer ({len(moe)}) or one per block ({info.block_count}, "
                        "0 on dense blocks)")
    bad = [i for i in range(info.block_count) if (i in moe and not 1 <= ks[i] <= info.expert_count)
           or (i not in moe and ks[i] != 0)]
    if bad:
        i = bad[0]
        want = f"1..{info.expert_count}" if i in moe else "0 (a dense block)"
        raise LexiError(f"block {i}: k {ks[i]} does not fit: give {want}")
    return Budget(COUNTS + ",".join(str(ks[i]) for i in moe), ROW_CUSTOM, ks)


def run_budget(llm, b: Budget, *, keep_cache: bool = False) -> None:
    """Make a loaded model run this budget from its next token on (a ladder row, or any counts)."""
    if b.row == ROW_CUSTOM:
        set_expert_counts(llm, b.counts, keep_cache=keep_cache)
    else:
        set_lexi_row(llm, b.row, keep_cache=keep_cache)


def resolve(info, spec: str, name: str) -> Budget:
    """A budget name, fraction or `k=8,6,...` -> Budget; unknown ones are an error listing what the file
    stores."""
    spec = spec.strip().lower()
    if spec.startswith(COUNTS):
        try:
            ks = [int(x) for x in spec[len(COUNTS):].replace(" ", "").split(",") if x != ""]
        except ValueError:
            raise LexiError(f"budget {spec!r}: give k=K1,K2,... (integers, one per MoE layer)") from None
        return custom(info, ks)
    ladder = read_ladder(info)
    have = budgets(info, ladder)
    if spec in have:
        return have[spec]
    try:
        frac = float(spec)
    except ValueError:
        raise LexiError(f"unknown budget {spec!r}: use a stored fraction ({', '.join(k for k in have if k not in (FULL, DEFAULT)) or 'none stored'}), "
                        f"'{FULL}', '{DEFAULT}' or {COUNTS}K1,K2,... (any counts, one per MoE layer)") from None
    return have[f"{find_budget(ladder, frac, name)['budget']:g}"]
