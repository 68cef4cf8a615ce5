"""`lexi-gguf convert`: HF checkpoint -> profiled, allocated, converted and quantized GGUF, one file.

Stages: profile (or reuse a table) -> allocate (default budget + ladder) -> llama.cpp's own
convert_hf_to_gguf.py -> llama.cpp's own quantizer (llama_model_quantize) -> lexi keys (streamed copy
into the output). Intermediate files live in a temp folder beside the output and are removed on success
and failure; the output appears only when every stage succeeded. The disk it needs at its peak is
estimated and checked before any work (disk_plan).
"""
from __future__ import annotations

import errno
import shutil
import tempfile
from pathlib import Path

from .. import LexiError, read_json
from ..method.allocate import TABLE_FIX, allocate
from .apply import fit_counts, fit_ladder, fit_sensitivity
from ..gguf.writer import copy_with_metadata, lexi_metadata, require_free
from ..gguf.reader import model_info

DEFAULT_LADDER = (1.0, 0.875, 0.75, 0.625, 0.5)
FLOAT_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


def quant_ftype(name: str) -> int:
    import llama_cpp
    key = name.upper()
    attr = "LLAMA_FTYPE_ALL_F32" if key == "F32" else f"LLAMA_FTYPE_MOSTLY_{key}"
    if not hasattr(llama_cpp, attr):
        known = sorted(a.removeprefix("LLAMA_FTYPE_MOSTLY_") for a in dir(llama_cpp) if a.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise LexiError(f"unknown quantization {name!r}; llama.cpp knows: F32, {', '.join(known)}")
    return getattr(llama_cpp, attr)


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None, allow_requantize: bool = False) -> None:
    """llama.cpp's own quantizer through llama-cpp-python (the same code as llama-quantize);
    allow_requantize: from an already quantized file (llama-quantize --allow-requantize)."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quant_ftype(quant)
    params.nthread = threads or 0
    params.allow_requantize = allow_requantize
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        from ..runtime.llama import captured_log
        raise LexiError(f"llama.cpp's quantizer failed ({quant}, code {rc}); {captured_log()[-400:]}")


def bytes_per_weight(quant: str) -> float:
    """About how many bytes a weight takes in llama.cpp's `quant` mix: its main ggml type's size (Q4_K for
    Q4_K_M, ...), x1.2 for the tensors a mix keeps at more bits (embeddings, output, some attention)."""
    import gguf
    key = quant.upper()
    if key in FLOAT_TYPES:
        return {"F32": 4.0, "F16": 2.0, "BF16": 2.0}[key]
    for name in (key, key.rsplit("_", 1)[0], key.replace("_MOE", "")):
        t = getattr(gguf.GGMLQuantizationType, name, None)
        if t is not None:
            block, size = gguf.GGML_QUANT_SIZES[t]
            return 1.2 * size / block
    return 1.2    # an unknown mix: at most 8-bit-ish


def disk_plan(n_params: int, quant: str, outtype: str) -> tuple[int, str]:
    """(peak bytes on disk, what makes the peak): the converter's output, then quantized beside it, then
    the keys written into a copy of the quantized file (one full-size intermediate at a time)."""
    base = n_params * (4 if outtype == "f32" else 2)
    if quant.upper() in FLOAT_TYPES:
        return 2 * base, f"the converted {outtype} file and its keyed copy"
    q = min(base, int(n_params * bytes_per_weight(quant)))
    if base + q >= 2 * q:
        return base + q, f"the converted {outtype} file and the {quant.upper()} file quantized from it"
    return 2 * q, f"the {quant.upper()} file and its keyed copy"


def _stage(i: int, n: int, msg: str) -> None:
    print(f"[{i}/{n}] {msg}", flush=True)


def convert(model_dir: str | Path, out: str | Path, *, budget: float = 0.75, quant: str = "Q8_0",
            sensitivity: str | Path | None = None, budgets: list[float] | None = None, samples: int = 8192,
            seed: int = 0, threads: int | None = None, solver: str = "exact", allowed_k: list[int] | None = None,
            min_k: int = 1, force: bool = False, weight_norm: str = "renorm", calib_text: str | None = None,
            calib_tokens: int | None = None, calib_metric: str = "kld") -> Path:
    from ..method.profile import profile
    from ..runtime.llama import install_log_hook, llama_cpp_dir
    from .hf_to_gguf import convert_to_gguf
    from ..method.weights import SafetensorsSource

    out = Path(out)
    if out.exists() and not force:
        raise LexiError(f"{out} already exists; pass --force to overwrite it")
    if not out.parent.exists():
        raise LexiError(f"output folder {out.parent} does not exist")
    quant_ftype(quant)                       # unknown quant types fail before any work
    src = SafetensorsSource(model_dir)       # dense, unsupported, missing shards fail here
    outtype = FLOAT_TYPES.get(quant.upper(), "auto")
    peak, why = disk_plan(src.n_params(), quant, outtype)
    require_free(out.parent, peak, f"convert ({why}, estimated)")
    ladder_budgets = sorted(set(budgets if budgets else DEFAULT_LADDER) | {budget}, reverse=True)
    n = 5
    _stage(1, n, f"profile {src.model.spec.name}: {len(src.model.moe_layers)} MoE layers, "
                     f"{src.model.n_expert} experts, base k {src.model.k_base}")
    if sensitivity and calib_text is not None:
        raise LexiError("give --calib or --sensitivity, not both: a given table is used as it is")
    if calib_text is not None:
        from ..method.calib import check_metric
        check_metric(calib_metric)
        print(f"      calibrated ({calib_metric}): profiled after conversion, while the model reads the text")
        sens = None
    elif sensitivity:
        sens = read_json(sensitivity, TABLE_FIX)
        print(f"      reusing {sensitivity}")
        from .apply import check_weight_norm
        check_weight_norm(sens, weight_norm)
    else:
        sens = profile(src, samples=samples, seed=seed, threads=threads, weight_norm=weight_norm)

    def plan_and_ladder(sens):
        _stage(2, n, f"allocate budget {budget} (+ ladder {', '.join(f'{b:g}' for b in ladder_budgets)})")
        plan = allocate(sens, budget=budget, solver=solver, allowed_k=allowed_k, min_k=min_k, seed=seed)
        ladder = [allocate(sens, budget=b, solver=solver, allowed_k=allowed_k, min_k=min_k, seed=seed) for b in ladder_budgets]
        print(f"      k per layer: {plan['expert_used_count']} (total {plan['total']})")
        return plan, ladder
    if sens is not None:
        plan, ladder = plan_and_ladder(sens)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _stage(3, n, f"convert with llama.cpp's convert_hf_to_gguf.py (--outtype {outtype})")
        base = convert_to_gguf(model_dir, tmpdir / "base.gguf", llama_cpp_dir(), outtype=outtype)
        info = model_info(base)
        if sens is None:   # calibrated: the converted model reads the text
            from ..method.calib import calibrated_sensitivity
            sens = calibrated_sensitivity(base, src, calib_text, metric=calib_metric, tokens=calib_tokens,
                                          threads=threads, weight_norm=weight_norm, samples=samples, seed=seed)
            plan, ladder = plan_and_ladder(sens)
        if quant.upper() in FLOAT_TYPES:
            _stage(4, n, f"no quantization ({quant.upper()})")
            unkeyed = base
        else:
            _stage(4, n, f"quantize to {quant.upper()} with llama.cpp's quantizer")
            install_log_hook()
            unkeyed = tmpdir / "quant.gguf"
            quantize(base, unkeyed, quant, threads)
            base.unlink()                   # one full-size intermediate at a time
        _stage(5, n, "write lexi keys, ladder and sensitivity table")
        ladder = fit_ladder(ladder, sens, info)
        copy_with_metadata(unkeyed, out, lexi_metadata(info, fit_counts(plan["expert_used_count"], sens, info),
                                                       f"lexi-{solver}", sensitivity=fit_sensitivity(sens, info),
                                                       ladder=ladder, weight_norm=weight_norm),
                           force=force, progress=False)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise LexiError(f"the disk holding {out.parent} is full; temporary files were removed, nothing was written") from None
        raise LexiError(f"convert failed: {e}; temporary files were removed, nothing was written") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return out
