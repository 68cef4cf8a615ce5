"""`convert`, `apply`, `relayout` and `inspect`: the lexi GGUF, written and read back."""
from __future__ import annotations

from pathlib import Path

from .. import LexiError
from ..gguf import keys
from ..method.profile import DEFAULT_SAMPLES
from .common import (WEIGHT_NORM_HELP, add_alloc_opts, add_calib_opts, add_json_opt, add_solver_opts, allowed_k,
                     budget, budget_fraction, calib_text, floats, ints, path, write_json)


def cmd_apply(args) -> None:
    from ..export.apply import apply
    out = apply(args.input, args.output, k=args.k, plan=args.plan, sensitivity=args.sensitivity,
                budget=budget_fraction(args.budget), total=args.total, avg_k=args.avg_k, budgets=args.budgets, solver=args.solver,
                allowed_k=allowed_k(args),
                min_k=args.min_k, samples=args.samples, seed=args.seed, threads=args.threads, force=args.force,
                weight_norm=args.weight_norm, calib_text=calib_text(args), calib_tokens=args.calib_tokens,
                calib_metric=args.calib_metric)
    print(f"wrote {out}")


def cmd_convert(args) -> None:
    from ..export.convert import convert
    convert(args.model_dir, args.output, budget=budget_fraction(args.budget), quant=args.quant, sensitivity=args.sensitivity,
            budgets=args.budgets, samples=args.samples, seed=args.seed, threads=args.threads,
            solver=args.solver, allowed_k=allowed_k(args), min_k=args.min_k, force=args.force,
            weight_norm=args.weight_norm, calib_text=calib_text(args), calib_tokens=args.calib_tokens,
            calib_metric=args.calib_metric)


def cmd_inspect(args) -> None:
    from ..export.inspect import inspect_gguf, render
    info = inspect_gguf(args.model)
    if args.json:
        write_json(info, args.json)
        if args.json != "-":
            print(f"json -> {args.json}")
    else:
        print(render(info))


def cmd_relayout(args) -> None:
    from ..export.relayout import relayout_from_trace
    out = relayout_from_trace(args.model, args.output, args.trace, force=args.force)
    print(f"wrote {out}")


def cmd_synth(args) -> None:
    from ..testbeds import shapes, synth
    if bool(args.like) == bool(args.config):
        raise LexiError("give exactly one of --like NAME (" + ", ".join(shapes.SHAPES) + ") or --config SHAPE.json")
    full = shapes.get(args.like) if args.like else shapes.from_config(args.config)
    s = shapes.reduced(full, args.layers, args.experts)
    r = synth.synth(s, args.quant, args.output, full_layers=full.layers, force=args.force, seed=args.seed)
    how = "from the cache" if r["cached"] else "written"
    print(f"{r['path']}: {s.name} at {args.quant}, {s.layers} layers x {s.experts} experts (k {s.k}), "
          f"{r['bytes'] / 2**30:.2f} GiB, {how} in {r['seconds']:.1f} s")


def register(sub) -> None:
    p = sub.add_parser("apply", help="write lexi keys into a GGUF (streamed copy, atomic)")
    p.add_argument("input")
    p.add_argument("-o", "--output", type=path, required=True)
    p.add_argument("--k", type=ints, help="k per block, comma-separated, 0 on dense blocks")
    p.add_argument("--plan", type=path, help="a plan.json from `allocate`")
    p.add_argument("--sensitivity", type=path,
                   help="a sensitivity.json (else the file's stored table, else profile the GGUF)")
    p.add_argument("--budgets", type=floats, help="ladder of budgets stored in the file, e.g. 1,0.75,0.5")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    p.add_argument("--threads", type=int)
    p.add_argument("--force", action="store_true", help="overwrite the output")
    p.add_argument("--weight-norm", default="renorm", choices=keys.WEIGHT_NORMS, help=WEIGHT_NORM_HELP)
    add_calib_opts(p)
    add_alloc_opts(p, False)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("convert", help="HF checkpoint -> profiled, allocated, converted, quantized GGUF")
    p.add_argument("model_dir", type=Path)
    p.add_argument("-o", "--output", type=path, required=True)
    p.add_argument("--budget", type=budget, default=0.75, help="default budget the runtime uses (fraction of base)")
    p.add_argument("--budgets", type=floats, help="ladder stored in the file (default 1,0.875,0.75,0.625,0.5)")
    p.add_argument("--quant", default="Q8_0", help="Q4_K_M, Q5_K_M, Q8_0, F16, BF16, F32, ... (llama.cpp's names)")
    p.add_argument("--sensitivity", type=path, help="reuse a sensitivity.json instead of profiling")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    p.add_argument("--threads", type=int)
    p.add_argument("--force", action="store_true")
    p.add_argument("--weight-norm", default="renorm", choices=keys.WEIGHT_NORMS, help=WEIGHT_NORM_HELP)
    add_calib_opts(p)
    add_solver_opts(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="per-layer k, budgets and savings stored in a GGUF")
    p.add_argument("model")
    add_json_opt(p, "what is in the file")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("relayout", help="store each MoE layer's experts in co-activation order (from a trace of "
                       "this file): what a token uses together lies together on disk")
    p.add_argument("model")
    p.add_argument("--trace", type=path, required=True, help="a routing trace of this file (`lexi-gguf trace`)")
    p.add_argument("-o", "--output", type=path, required=True)
    p.add_argument("--force", action="store_true", help="overwrite the output")
    p.set_defaults(func=cmd_relayout)

    p = sub.add_parser("synth", help="a GGUF at the exact shape of a released MoE (random weights in valid blocks, "
                       "the real vocabulary, a synthetic LExI ladder), cached; docs/true-size.md")
    p.add_argument("--like", help="a released shape: qwen3-30b-a3b, mixtral-8x7b, deepseek-v2-lite, olmoe-1b-7b, "
                   "gpt-oss-20b")
    p.add_argument("--config", type=path, help="a shape as JSON (the fields of testbeds.shapes.Shape)")
    p.add_argument("--quant", default="Q4_K_M", help="llama-quantize's mix: Q4_K_M, Q8_0, IQ4_XS, MXFP4 (gpt-oss)")
    p.add_argument("-o", "--output", type=path, help="where the file goes (a link to the cached file); "
                   "default: the cache's path")
    p.add_argument("--layers", type=int, help="the first N layers only (same per-layer shape), for tests")
    p.add_argument("--experts", type=int, help="N experts per MoE layer instead of the shape's, for tests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="overwrite the output")
    p.set_defaults(func=cmd_synth)
