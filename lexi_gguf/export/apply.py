"""`lexi-gguf apply`: put per-layer expert counts (and optionally a ladder of budgets and the
sensitivity table) into a GGUF, as a streamed, atomic copy."""
from __future__ import annotations

import sys
from pathlib import Path

from .. import LexiError, read_json
from ..method.allocate import TABLE_FIX, allocate
from ..gguf import keys
from ..gguf.split import output_names
from ..gguf.writer import copy_space, copy_with_metadata, lexi_metadata, require_free
from ..gguf.reader import lexi_problem, model_info, sensitivity_from_gguf, validate_counts


def check_weight_norm(sens: dict, weight_norm: str) -> None:
    """A table profiled for one weighting mode does not allocate for the other."""
    got = sens.get("settings", {}).get("weight_norm", "renorm")
    if got != weight_norm:
        raise LexiError(f"the sensitivity table was profiled with weight norm {got!r}, not {weight_norm!r}; "
                        "profile again (leave out --sensitivity) or pass the matching --weight-norm")


def sensitivity_for(info, sensitivity: str | Path | dict | None, *, stored: dict | None, samples: int, seed: int,
                    threads: int | None, source_path: Path, weight_norm: str = "renorm", calib_text: str | None = None,
                    calib_tokens: int | None = None, calib_metric: str = "kld") -> dict:
    """A sensitivity table for the model: given, stored in the file (`stored`), or profiled from the GGUF's
    weights (with calib_text: calibrated while the GGUF reads that text, calib.calibrated_sensitivity)."""
    if isinstance(sensitivity, dict):
        sens = sensitivity
    elif sensitivity:
        sens = read_json(sensitivity, TABLE_FIX)
    else:
        # the stored table serves its own weight-norm mode; another mode (or --calib) profiles anew
        mode = (stored or {}).get("settings", {}).get("weight_norm", "renorm")
        sens = stored if mode == weight_norm and calib_text is None else None
        if sens is None:
            from ..method.gguf_weights import GGUFSource
            from ..method.profile import profile
            src = GGUFSource(source_path)
            if calib_text is not None:
                from ..method.calib import calibrated_sensitivity
                sens = calibrated_sensitivity(source_path, src, calib_text, metric=calib_metric, tokens=calib_tokens,
                                              threads=threads, weight_norm=weight_norm, samples=samples, seed=seed)
            else:
                sens = profile(src, samples=samples, seed=seed, threads=threads, weight_norm=weight_norm)
                t = sens["timing"]
                print(f"profiled {len(src.model.moe_layers)} MoE layers in {t['seconds']:.1f} s "
                      f"({t['gflop_per_s']:.0f} GFLOP/s, {samples} samples a layer)", flush=True)
            sens["source"] = "gguf:" + "+".join(src.types)
    check_weight_norm(sens, weight_norm)
    extra_blocks(sens, info)
    if int(sens["k_base"]) != info.expert_used_count:
        raise LexiError(f"the sensitivity table has base k {sens['k_base']}, the model {info.expert_used_count}")
    return sens


def extra_blocks(sens: dict, info) -> list[int]:
    """GGUF blocks after the checkpoint's layers (GLM-4.5's NextN/MTP block: the converter adds it, the
    main graph never runs it). They keep the model's own k and stay out of the budget."""
    n = len(sens["layers"])
    moe = [L["index"] for L in sens["layers"] if L["moe"]]
    if n > info.block_count or moe != [i for i in info.moe_layers if i < n]:
        raise LexiError(f"the sensitivity table (MoE layers {moe}) does not match {info.path.name} "
                        f"(MoE layers {info.moe_layers}); it was made for another model")
    return list(range(n, info.block_count))


def fit_counts(counts: list[int], sens: dict, info) -> list[int]:
    """Per-layer counts of the checkpoint's layers, extended to every block of the GGUF."""
    base = info.base_counts
    return list(counts) + [base[i] for i in extra_blocks(sens, info)]


def fit_ladder(ladder: list[dict], sens: dict, info) -> list[dict]:
    """Allocated ladder rows with their counts extended to every block of the GGUF (fit_counts)."""
    return [{**r, "expert_used_count": fit_counts(r["expert_used_count"], sens, info)} for r in ladder]


def fit_sensitivity(sens: dict, info) -> dict:
    """The table extended to the GGUF's blocks (extra blocks as not profiled), for the file's metadata."""
    extra = extra_blocks(sens, info)
    if not extra:
        return sens
    return {**sens, "layers": sens["layers"] + [{"index": i, "moe": False, "deviation": None, "stderr": None}
                                                for i in extra]}


def apply(src: str | Path, out: str | Path, *, k: list[int] | None = None, plan: str | dict | None = None,
          sensitivity=None, budget: float | None = None, total: int | None = None,
          avg_k: float | None = None, budgets: list[float] | None = None,
          solver: str = "exact", allowed_k: list[int] | None = None, min_k: int = 1, samples: int = 8192,
          seed: int = 0, threads: int | None = None, force: bool = False, progress: bool = True,
          weight_norm: str = "renorm", calib_text: str | None = None, calib_tokens: int | None = None,
          calib_metric: str = "kld") -> Path:
    src, out = Path(src), Path(out)
    info = model_info(src, check_lexi=False)     # a split set: every shard is opened and checked here
    damaged = lexi_problem(info)
    outs = output_names(out, len(info.shards))
    if {p.resolve() for p in outs} & {p.resolve() for p in info.shards}:
        raise LexiError("the output must be a new file, not the input")
    for o in outs:
        if o.exists() and not force:
            raise LexiError(f"{o} already exists; pass --force to overwrite it")
    if not out.parent.exists():
        raise LexiError(f"output folder {out.parent} does not exist")
    require_free(out.parent, copy_space(info.shards, out.parent), f"writing {outs[0].name}")   # before profiling
    if not info.is_moe:
        raise LexiError(f"{src.name} ({info.arch}) has no MoE layers: this is a dense model, LExI has nothing to adapt")
    if sum(x is not None for x in (k, plan, budget, total, avg_k)) != 1:
        raise LexiError("give exactly one of --k LIST, --plan plan.json, --budget FRACTION, --total N or --avg-k K")
    if calib_text is not None and sensitivity:
        raise LexiError("give --calib or --sensitivity, not both: a given table is used as it is")
    if damaged and damaged.startswith(keys.EXPERT_ORDER):     # apply keeps the expert order: it cannot mend it
        raise LexiError(f"{src.name}: {damaged}; the stored expert order is damaged: relayout the original model again")
    if damaged and k is None and plan is None:
        raise LexiError(f"{src.name}: {damaged}; the file's lexi keys are damaged and cannot be reused: give the "
                        "counts (--k LIST or --plan plan.json) to replace them, or apply to the original model file")
    if damaged:     # --k / --plan replace every lexi key: the damaged ones are dropped, said once
        print(f"lexi-gguf: {src.name}: {damaged}; the damaged lexi keys are replaced", file=sys.stderr)
    stored = None if damaged else sensitivity_from_gguf(info)
    sens = None
    if k is not None:
        counts, method = list(k), "manual"
        sens = stored
    elif plan is not None:
        pl = plan if isinstance(plan, dict) else read_json(plan, "give a plan.json from `lexi-gguf allocate`")
        counts, method = list(pl["expert_used_count"]), f"lexi-{pl.get('solver', 'exact')}"
        sens = stored
    else:
        sens = sensitivity_for(info, sensitivity, stored=stored, samples=samples, seed=seed, threads=threads, source_path=src,
                               weight_norm=weight_norm, calib_text=calib_text, calib_tokens=calib_tokens,
                               calib_metric=calib_metric)
        counts = allocate(sens, budget=budget, total=total, avg_k=avg_k, solver=solver, allowed_k=allowed_k, min_k=min_k, seed=seed)["expert_used_count"]
        counts = fit_counts(counts, sens, info)
        method = f"lexi-{solver}"
    validate_counts(info, counts)
    ladder = None
    if budgets:
        if sens is None:
            sens = sensitivity_for(info, sensitivity, stored=stored, samples=samples, seed=seed, threads=threads, source_path=src,
                               weight_norm=weight_norm, calib_text=calib_text, calib_tokens=calib_tokens,
                               calib_metric=calib_metric)
        ladder = [allocate(sens, budget=b, solver=solver, allowed_k=allowed_k, min_k=min_k, seed=seed) for b in budgets]
        ladder = fit_ladder(ladder, sens, info)
    if sens is not None:
        sens = fit_sensitivity(sens, info)
    md = lexi_metadata(info, counts, method, sensitivity=sens, ladder=ladder, weight_norm=weight_norm)
    return copy_with_metadata(src, out, md, force=force, progress=progress)
