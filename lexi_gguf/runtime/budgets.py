"""Budgets by name: what a user types (`0.75`, `full`, nothing) -> the ladder row the runtime runs.

Names: a stored budget fraction (`0.5`) is that row of lexi.ladder.expert_used_count; `full` is the
model's own k in every layer (lexi off); `default` is what the file (or the load-time override) chose.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import LexiError
from ..gguf import keys
from ..gguf.reader import read_ladder
from .llama import ROW_LOADED, ROW_MODEL

FULL, DEFAULT = "full", "default"


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


def resolve(info, spec: str, name: str) -> Budget:
    """A budget name or fraction -> Budget; unknown ones are an error listing what the file stores."""
    spec = spec.strip().lower()
    ladder = read_ladder(info)
    have = budgets(info, ladder)
    if spec in have:
        return have[spec]
    try:
        frac = float(spec)
    except ValueError:
        raise LexiError(f"unknown budget {spec!r}: use a stored fraction ({', '.join(k for k in have if k not in (FULL, DEFAULT)) or 'none stored'}), "
                        f"'{FULL}' or '{DEFAULT}'") from None
    return have[f"{find_budget(ladder, frac, name)['budget']:g}"]
