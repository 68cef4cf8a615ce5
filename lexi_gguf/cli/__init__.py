"""lexi-gguf command line. Every user-facing failure is a LexiError: one line, exit status 2."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import LexiError, __version__
from ..gguf import keys


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _write_json(obj: dict, out: str | Path, force: bool = True) -> None:
    from ..gguf.writer import atomic_output
    with atomic_output(out, force=force) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def _read_json(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise LexiError(f"{p} does not exist")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise LexiError(f"{p} is not valid JSON ({e})") from None


def _allowed_k(args) -> list[int] | None:
    from ..method.backends import safe_k
    allowed = args.allowed_k
    if getattr(args, "backend_safe", None):
        s = safe_k(args.backend_safe)
        allowed = sorted(set(allowed) & s) if allowed else sorted(s) if s else allowed
    return allowed


WEIGHT_NORM_HELP = ("how a layer running fewer experts than trained weights them (normalising archs): renorm "
                    "(divide by their own sum, default) or base (by the trained top-k's sum: no inflation); "
                    "written as lexi.weight_norm and profiled the same way")

# ---------------------------------------------------------------- commands

def cmd_build_runtime(args) -> None:
    from ..runtime.build import build_runtime
    build_runtime(args.backend, args.jobs, tools=not args.no_tools)


def cmd_doctor(args) -> None:
    from ..runtime.llama import doctor
    d = doctor()
    print(json.dumps(d, indent=2))
    c = d["cpu"]
    have = [f for f, on in c["features"].items() if on]
    print(f"cpu: {c['model']} (class {c['class']}; {' '.join(have) or 'no x86 SIMD flags'})")
    if d["ggml_cpu_paths"] is not None:
        paths = [k for k, v in d["ggml_cpu_paths"].items() if v == "1"]
        print(f"ggml CPU paths compiled in: {' '.join(paths)}")
        print(f"AMX matmul path: {'compiled in' if d['amx_matmul_compiled'] else 'not compiled in (docs/backends.md)'}")
    print(f"build flags: {' '.join(d['build_flags'] or []) or 'unknown (runtime not built by lexi-gguf)'}")
    if not d["patched"]:
        raise LexiError("the llama_cpp in use is not the lexi-patched build; run `make setup`")
    print("ok: the llama_cpp in use honours lexi.expert_used_count")


def _calib_text(args) -> str | None:
    if args.calib is None:
        return None
    from ..method.calib import read_text
    return read_text(args.calib)


def _calibrated(args, src, **profile_kw) -> dict | None:
    """--calib on `profile`: the table measured with --calib-model, or with a temporary conversion."""
    text = _calib_text(args)
    if text is None:
        return None
    import tempfile

    from ..method.calib import calibrated_sensitivity

    def run(gguf_path):
        return calibrated_sensitivity(gguf_path, src, text, metric=args.calib_metric, tokens=args.calib_tokens,
                                      threads=args.threads, samples=args.samples, seed=args.seed, **profile_kw)
    if args.calib_model:
        return run(args.calib_model)
    from ..runtime.llama import llama_cpp_dir
    from ..export.hf_to_gguf import convert_to_gguf
    out_dir = Path(args.output).resolve().parent
    with tempfile.TemporaryDirectory(prefix=".calib.", dir=out_dir) as tmp:
        print("converting a temporary GGUF to read the calibration text (pass --calib-model to reuse one)", flush=True)
        return run(convert_to_gguf(args.model_dir, Path(tmp) / "calib.gguf", llama_cpp_dir(), outtype="auto"))


def add_calib_opts(p) -> None:
    p.add_argument("--calib", metavar="TEXT", help="calibrated profiling while the model reads this UTF-8 text "
                   "(default: data-free, N(0,1) inputs)")
    p.add_argument("--calib-metric", default="kld", choices=["kld", "deviation"],
                   help="with --calib: kld (default) measures each layer and k end to end, one pass over the text "
                   "per (MoE layer, k); deviation feeds Stage 1 the captured MoE inputs (one pass)")
    p.add_argument("--calib-tokens", type=int, help="calibration tokens to use (default: 1024 for kld, 4096 for deviation)")


def cmd_profile(args) -> None:
    from ..method.profile import profile
    from ..method.weights import SafetensorsSource
    src = SafetensorsSource(args.model_dir)
    opts = dict(device=args.device, draw_tokens=args.draw_tokens, dtype=args.compute_dtype)
    sens = _calibrated(args, src, **opts)
    if sens is None:
        sens = profile(src, samples=args.samples, seed=args.seed, threads=args.threads, input_mode=args.input, **opts)
    _write_json(sens, args.output)
    t = sens["timing"]
    rate = f" ({t['gflop_per_s']:.0f} GFLOP/s)" if "gflop_per_s" in t else ""
    print(f"profiled {len(src.model.moe_layers)} MoE layers of {sens['arch']} (k_base {sens['k_base']}, "
          f"{sens['n_expert']} experts) in {t['seconds']:.1f} s{rate} -> {args.output}")
    if args.plot:
        from ..measure.plots import sensitivity_heatmap
        print(f"heatmap -> {sensitivity_heatmap(sens, args.plot)}")


def cmd_allocate(args) -> None:
    from ..method.allocate import allocate
    sens = _read_json(args.sensitivity)
    plan = allocate(sens, budget=args.budget, total=args.total, avg_k=args.avg_k, solver=args.solver,
                    allowed_k=_allowed_k(args), min_k=args.min_k, seed=args.seed, compare=args.compare)
    _write_json(plan, args.output)
    print(f"k per layer: {plan['expert_used_count']}  total {plan['total']} (avg k {plan['avg_k']:.2f}, "
          f"budget {plan['budget']:.3f})  objective {plan['objective']:.6g} [{plan['solver']}]")
    if plan.get("uniform_objective") is not None:
        print(f"uniform k={plan['total'] // sum(1 for L in sens['layers'] if L['moe'])} objective "
              f"{plan['uniform_objective']:.6g}")
    if plan.get("objectives"):
        print("objectives: " + ", ".join(f"{k} {v:.6g}" for k, v in plan["objectives"].items()))
    if args.plot:
        from ..measure.plots import sensitivity_heatmap
        print(f"heatmap -> {sensitivity_heatmap(sens, args.plot, plan)}")
    print(f"plan -> {args.output}")


def cmd_apply(args) -> None:
    from ..export.apply import apply
    out = apply(args.input, args.output, k=args.k, plan=args.plan, sensitivity=args.sensitivity,
                budget=args.budget, budgets=args.budgets, solver=args.solver, allowed_k=_allowed_k(args),
                min_k=args.min_k, samples=args.samples, seed=args.seed, threads=args.threads, force=args.force,
                weight_norm=args.weight_norm, calib_text=_calib_text(args), calib_tokens=args.calib_tokens,
                calib_metric=args.calib_metric)
    print(f"wrote {out}")


def cmd_inspect(args) -> None:
    from ..export.inspect import inspect_gguf, render
    info = inspect_gguf(args.model)
    print(json.dumps(info, indent=2) if args.json else render(info))


def cmd_convert(args) -> None:
    from ..export.convert import convert
    convert(args.model_dir, args.output, budget=args.budget, quant=args.quant, sensitivity=args.sensitivity,
            budgets=args.budgets, samples=args.samples, seed=args.seed, threads=args.threads,
            solver=args.solver, allowed_k=_allowed_k(args), min_k=args.min_k, force=args.force,
            weight_norm=args.weight_norm, calib_text=_calib_text(args), calib_tokens=args.calib_tokens,
            calib_metric=args.calib_metric)


def cmd_chat(args) -> None:
    from ..serve.chat import chat
    chat(args.model, budget=args.budget, no_lexi=args.no_lexi, n_gpu_layers=args.n_gpu_layers,
         threads=args.threads, max_tokens=args.max_tokens, n_ctx=args.ctx, temperature=args.temperature,
         seed=args.seed, prefetch=args.prefetch)


def cmd_serve(args) -> None:
    from ..serve import serve
    serve(args.model, budget=args.budget, host=args.host, port=args.port, n_ctx=args.ctx, threads=args.threads,
          n_gpu_layers=args.n_gpu_layers, api_key=args.api_key, prefetch=args.prefetch)


def _lines(path: str, what: str) -> list[str]:
    p = Path(path)
    if not p.exists():
        raise LexiError(f"{p} does not exist; give a UTF-8 text file with {what}")
    return p.read_text(errors="replace").splitlines()


def cmd_trace(args) -> None:
    from ..caching.trace import record
    if bool(args.text) == bool(args.prompts):
        raise LexiError("give exactly one of --text FILE (read, no generation) or --prompts FILE (one prompt a line)")
    kw = {"texts": ["\n".join(_lines(args.text, "--text"))]} if args.text else \
         {"prompts": [x for x in _lines(args.prompts, "--prompts") if x.strip()]}
    tr = record(args.model, **kw, budget=args.budget, no_lexi=args.no_lexi, uniform_k=args.uniform_k,
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                hidden=args.hidden, n_ctx=args.ctx, threads=args.threads,
                n_gpu_layers=args.n_gpu_layers)
    out = tr.save(args.output)
    m = tr.meta
    print(f"traced {len(tr.tokens)} tokens ({int(tr.generated.sum())} generated) x {len(tr.moe_layers)} MoE layers "
          f"at budget {m['budget']} (k per MoE layer {tr.counts.tolist()}) in {m['seconds']:.1f} s "
          f"(callback {m['callback_seconds']:.2f} s) -> {out}")


def cmd_predictor(args) -> None:
    from ..caching import predict
    from ..caching.trace import Trace
    tr = Trace.load(args.trace)
    if args.action == "train":
        if not args.output:
            raise LexiError("predictor train needs -o PREDICTOR.pt")
        learner = predict.LearnedPredictor(tr.hidden.shape[-1] if tr.hidden is not None else 0, tr.n_expert,
                                           len(tr.moe_layers), args.depth)
        fit = learner.fit(tr, epochs=args.epochs, log=print)
        learner.save(args.output)
        print(f"trained on {fit['examples']} (layer, look-ahead) examples of {len(tr.tokens)} tokens -> {args.output}")
        return
    rows = []
    if args.model:
        for d, p in predict.router_predictions(tr, args.model, depth=args.depth).items():
            rows.append({"predictor": f"router d={d}", **predict.score(tr, p)})
    if args.predictor:
        for d, p in predict.LearnedPredictor.load(args.predictor).predictions(tr).items():
            rows.append({"predictor": f"learned d={d}", **predict.score(tr, p)})
    if not rows:
        raise LexiError("give --model MODEL.gguf (router look-ahead) and/or --predictor PREDICTOR.pt (learned)")
    rows.append({"predictor": "random", **predict.score(tr, predict.random_predictions(tr)[1])})
    print("| predictor | recall@k | precision | F1 | accuracy | all-zeros accuracy |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['predictor']} | {r['recall']:.3f} | {r['precision']:.3f} | {r['f1']:.3f} | {r['accuracy']:.3f} | "
              f"{r['all_zeros_accuracy']:.3f} |")
    if args.json:
        _write_json({"trace": tr.meta, "rows": rows}, args.json)
        print(f"json -> {args.json}")


def cmd_cache_sim(args) -> None:
    from ..caching import predict, simulate
    from ..caching.trace import Trace
    tr = Trace.load(args.trace)
    predictors = {"oracle": simulate.oracle_predictions(tr, args.depth), "random": predict.random_predictions(tr, args.depth)}
    if "router" in args.policy:
        if not args.model:
            raise LexiError("--policy router needs --model MODEL.gguf (the routers it applies)")
        predictors["router"] = predict.router_predictions(tr, args.model, depth=args.depth)
    if "learned" in args.policy:
        if not args.predictor:
            raise LexiError("--policy learned needs --predictor PREDICTOR.pt (lexi-gguf predictor train)")
        predictors["learned"] = predict.LearnedPredictor.load(args.predictor).predictions(tr)
    res = simulate.run(tr, args.capacity, args.policy, predictors=predictors, depth=args.depth, phase=args.phase,
                       slot_mode=args.slots)
    print(simulate.table(res, args.link))
    js = Path(args.json) if args.json else Path(args.trace).with_suffix(".cache.json")
    _write_json(res, js)
    png = simulate.plot(res, args.plot or js.with_suffix(".png"))
    print(f"json -> {js}\nplot -> {png}")


def _outputs(args, stem: str) -> tuple[Path, Path]:
    js = Path(args.json) if args.json else Path(args.model).with_suffix(f".{stem}.json")
    png = Path(args.plot) if args.plot else js.with_suffix(".png")
    return js, png


def cmd_bench(args) -> None:
    from ..measure.bench import bench, plot, switch_bench, switch_table, table
    if args.mem_limit:
        if args.switch or args.n_gpu_layers:
            raise LexiError("--mem-limit runs each configuration in its own memory-limited CPU process: "
                            "leave out --switch and --n-gpu-layers")
        from ..measure import memlimit
        # each token may read hundreds of MB from disk: fewer tokens and one repetition unless asked
        res = memlimit.bench_mem_limited(args.model, args.budgets, mem_limit=args.mem_limit, n_gen=args.n_gen or 16,
                                         warmup=args.warmup, threads=args.threads, reps=args.reps or 1,
                                         prefetch=tuple(args.prefetch.split(",")))
        js, png = _outputs(args, "memlimit")
        print(memlimit.table(res))
        _write_json(res, js)
        memlimit.plot(res, png)
        print(f"json -> {js}\nplot -> {png}")
        return
    if args.n_gen is None:
        args.n_gen = 128
    if args.reps is None:
        args.reps = 3
    if "," in args.prefetch:
        raise LexiError("several --prefetch modes are compared with --mem-limit only; give one mode")
    if args.switch:
        res = switch_bench(args.model, args.budgets, n_gen=args.n_gen, threads=args.threads, n_gpu_layers=args.n_gpu_layers)
        js = Path(args.json) if args.json else Path(args.model).with_suffix(".switch.json")
        print(switch_table(res))
        _write_json(res, js)
        print(f"json -> {js}")
        return
    res = bench(args.model, args.budgets, n_prompt=args.n_prompt, n_gen=args.n_gen, reps=args.reps,
                threads=args.threads, n_gpu_layers=args.n_gpu_layers, prefetch=args.prefetch)
    js, png = _outputs(args, "bench")
    print(table(res))
    _write_json(res, js)
    plot(res, png)
    print(f"json -> {js}\nplot -> {png}")


def cmd_eval(args) -> None:
    from ..measure.evaluate import cross_check, evaluate, pareto_plot, table
    text_path = Path(args.text)
    if not text_path.exists():
        raise LexiError(f"{text_path} does not exist; give a UTF-8 text file with --text")
    res = evaluate(args.model, text_path.read_text(errors="replace"), args.budgets, ctx=args.ctx,
                   threads=args.threads, n_gpu_layers=args.n_gpu_layers, max_chunks=args.chunks)
    if args.cross_check:
        res["llama_perplexity"] = cross_check(args.model, text_path, args.ctx, args.threads, res["chunks"])
        print(f"llama-perplexity (full model): PPL {res['llama_perplexity']['ppl']:.4f}  ours {res['rows'][0]['ppl']:.4f}")
    js, png = _outputs(args, "eval")
    print(table(res))
    _write_json(res, js)
    bench_res = _read_json(args.bench) if args.bench else None
    pareto_plot(res, png, bench_res)
    print(f"json -> {js}\nplot -> {png}")


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lexi-gguf", description=__doc__)
    ap.add_argument("--version", action="version", version=f"lexi-gguf {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("build-runtime", help="build the patched llama-cpp-python and llama.cpp tools (cached)")
    p.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "metal"])
    p.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    p.add_argument("--no-tools", action="store_true", help="skip llama-bench/llama-perplexity/llama-quantize")
    p.set_defaults(func=cmd_build_runtime)

    p = sub.add_parser("doctor", help="is the llama_cpp in use the lexi-patched build?")
    p.set_defaults(func=cmd_doctor)

    from ..method.profile import DEFAULT_DRAW_TOKENS, DEFAULT_SAMPLES
    p = sub.add_parser("profile", help="Stage 1: data-free per-layer sensitivity of a HF checkpoint")
    p.add_argument("model_dir", type=Path)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="random token vectors per layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    p.add_argument("--threads", type=int)
    p.add_argument("--draw-tokens", type=int, default=DEFAULT_DRAW_TOKENS, help="token vectors per draw")
    p.add_argument("--input", default="raw", choices=["raw", "rmsnorm"],
                   help="feed N(0,1) raw (the paper) or through the layer's RMSNorm weight")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="matmul dtype; auto measures bf16 vs f32 on this device for bf16/f16 weights")
    add_calib_opts(p)
    p.add_argument("--calib-model", metavar="GGUF", help="with --calib: a GGUF of the same model to read the text with "
                   "(default: a temporary conversion of MODEL_DIR)")
    p.add_argument("--plot", help="also write a PNG heatmap here")
    p.set_defaults(func=cmd_profile)

    def add_alloc_opts(p, required_budget: bool):
        g = p.add_mutually_exclusive_group(required=required_budget)
        g.add_argument("--budget", type=float, help="fraction of the base budget (layers x base k)")
        g.add_argument("--total", type=int, help="total active experts over MoE layers")
        g.add_argument("--avg-k", type=float, help="average active experts per MoE layer")
        p.add_argument("--solver", default="exact", choices=["exact", "evolutionary"])
        p.add_argument("--allowed-k", type=_ints, help="only these k, e.g. 1,2,4,8")
        p.add_argument("--backend-safe", choices=["cpu", "cuda", "metal"],
                       help="only k values this backend runs (metal: 1,2,4,5,6,8,10,16,22)")
        p.add_argument("--min-k", type=int, default=1)
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("allocate", help="Stage 2: per-layer k under a total budget")
    p.add_argument("sensitivity")
    p.add_argument("-o", "--output", required=True)
    add_alloc_opts(p, True)
    p.add_argument("--compare", action="store_true", help="also run the other solver and report both objectives")
    p.add_argument("--plot", help="heatmap PNG with the chosen k marked")
    p.set_defaults(func=cmd_allocate)

    p = sub.add_parser("apply", help="write lexi keys into a GGUF (streamed copy, atomic)")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--k", type=_ints, help="k per block, comma-separated, 0 on dense blocks")
    p.add_argument("--plan", help="a plan.json from `allocate`")
    p.add_argument("--sensitivity", help="a sensitivity.json (else the file's stored table, else profile the GGUF)")
    p.add_argument("--budgets", type=_floats, help="ladder of budgets stored in the file, e.g. 1,0.75,0.5")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    p.add_argument("--threads", type=int)
    p.add_argument("--force", action="store_true", help="overwrite the output")
    p.add_argument("--weight-norm", default="renorm", choices=keys.WEIGHT_NORMS, help=WEIGHT_NORM_HELP)
    add_calib_opts(p)
    add_alloc_opts(p, False)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("convert", help="HF checkpoint -> profiled, allocated, converted, quantized GGUF")
    p.add_argument("model_dir", type=Path)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--budget", type=float, default=0.75, help="default budget the runtime uses (fraction of base)")
    p.add_argument("--budgets", type=_floats, help="ladder stored in the file (default 1,0.875,0.75,0.625,0.5)")
    p.add_argument("--quant", default="Q8_0", help="Q4_K_M, Q5_K_M, Q8_0, F16, BF16, F32, ... (llama.cpp's names)")
    p.add_argument("--sensitivity", help="reuse a sensitivity.json instead of profiling")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--solver", default="exact", choices=["exact", "evolutionary"])
    p.add_argument("--allowed-k", type=_ints)
    p.add_argument("--backend-safe", choices=["cpu", "cuda", "metal"])
    p.add_argument("--min-k", type=int, default=1)
    p.add_argument("--force", action="store_true")
    p.add_argument("--weight-norm", default="renorm", choices=keys.WEIGHT_NORMS, help=WEIGHT_NORM_HELP)
    add_calib_opts(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("chat", help="streaming local chat (stdin may be piped; /budget X switches in place)")
    p.add_argument("model")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget", type=float, help="run a budget stored in the file's ladder")
    g.add_argument("--no-lexi", action="store_true", help="ignore the per-layer counts (model's own k)")
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefetch", default="off", choices=["off", "chosen", "guess"],
                   help="expert prefetch from the mmapped file (docs/memory.md): off, chosen experts, + next-layer guess")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("trace", help="record the experts every token selects in every MoE layer (npz)")
    p.add_argument("model")
    p.add_argument("--text", help="text file read in ctx-sized chunks, no generation")
    p.add_argument("--prompts", help="one prompt a line; each is followed by greedy generation")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget", help="a stored budget, 'full' or 'default'")
    g.add_argument("--no-lexi", action="store_true", help="the model's own k in every layer")
    g.add_argument("--uniform-k", type=int, help="this k in every MoE layer (what --override-kv does)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled with --seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", action="store_true", help="also record each MoE layer's router input (large)")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--threads", type=int)
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_trace)

    p = sub.add_parser("predictor", help="train a learned look-ahead predictor on a trace, or score predictors")
    p.add_argument("action", choices=["train", "eval"])
    p.add_argument("trace", help="a trace recorded with --hidden (train on one prompt set, eval on another)")
    p.add_argument("--model", help="eval: the GGUF the trace was recorded from (router look-ahead baseline)")
    p.add_argument("--predictor", help="eval: a learned predictor (.pt) from `predictor train`")
    p.add_argument("--depth", type=int, default=2, help="predict layer l+d from layer l, d = 1..depth")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("-o", "--output", help="train: where to write the predictor (.pt)")
    p.add_argument("--json")
    p.set_defaults(func=cmd_predictor)

    p = sub.add_parser("cache-sim", help="replay a trace through expert caches: hit rate, bytes, stalls")
    p.add_argument("trace")
    p.add_argument("--capacity", type=_floats, default=[0.05, 0.1, 0.25, 0.5], help="fractions of all routed experts")
    p.add_argument("--policy", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                   default=["lru", "lfu", "eamc", "belady", "router", "oracle"],
                   help="lru, lfu, eamc (MoE-Infinity-style), belady (offline optimum); "
                        "router / learned / oracle / random (prefetch)")
    p.add_argument("--model", help="the GGUF the trace was recorded from (for --policy router)")
    p.add_argument("--predictor", help="a learned predictor .pt (for --policy learned)")
    p.add_argument("--depth", type=int, default=1, help="prefetch layers l+1..l+depth")
    p.add_argument("--slots", default="global", choices=["global", "equal", "k"],
                   help="one shared cache, or per-layer quotas (equal, or following each layer's k)")
    p.add_argument("--phase", default="auto", choices=["auto", "decode", "all"])
    p.add_argument("--link", default="nvme", choices=["pcie4x16", "nvme", "emmc"], help="link for the stall column")
    p.add_argument("--json")
    p.add_argument("--plot")
    p.set_defaults(func=cmd_cache_sim)

    p = sub.add_parser("serve", help="OpenAI-compatible local server; every stored budget is a model id")
    p.add_argument("model")
    p.add_argument("--budget", help="the budget of the plain model id: a stored fraction, 'full' or 'default'")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default loopback; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", help="require this bearer token")
    p.add_argument("--prefetch", default="off", choices=["off", "chosen", "guess"],
                   help="expert prefetch from the mmapped file (docs/memory.md): off, chosen experts, + next-layer guess")
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--ctx", type=int, default=2048)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="prefill/decode tok/s: full vs uniform vs lexi at each budget")
    p.add_argument("model")
    p.add_argument("--budgets", type=_floats, default=[0.75, 0.5], help="budgets stored in the file (default 0.75,0.5)")
    p.add_argument("--n-prompt", type=int, default=512)
    p.add_argument("--n-gen", type=int, help="decode tokens (default 128; 16 with --mem-limit)")
    p.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --mem-limit)")
    p.add_argument("--prefetch", default="off",
                   help="expert prefetch mode: off, chosen or guess (docs/memory.md); with --mem-limit a list "
                        "to compare, e.g. off,chosen,guess")
    p.add_argument("--mem-limit", metavar="SIZE",
                   help="decode each configuration in a child inside a memory cgroup of SIZE (e.g. 3G, 3.5GiB; "
                        "needs root), the model mmapped and evicted first: tok/s, major faults and bytes read per token")
    p.add_argument("--warmup", type=int, default=4, help="with --mem-limit: decode tokens before timing (default 4)")
    p.add_argument("--threads", type=int)
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--switch", action="store_true",
                   help="one loaded model: decode tok/s per budget and the latency of switching budgets in place")
    p.add_argument("--json", help="results JSON (default MODEL.bench.json)")
    p.add_argument("--plot", help="PNG (default beside the JSON)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="perplexity and KL divergence vs the full model")
    p.add_argument("model")
    p.add_argument("--text", required=True, help="evaluation text file")
    p.add_argument("--budgets", type=_floats, default=[0.75, 0.5])
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, help="at most this many chunks")
    p.add_argument("--threads", type=int)
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--cross-check", action="store_true", help="also run llama-perplexity on the full model")
    p.add_argument("--bench", help="a bench JSON: plot KLD against measured decode speed")
    p.add_argument("--json", help="results JSON (default MODEL.eval.json)")
    p.add_argument("--plot", help="PNG (default beside the JSON)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", help="per-layer k, budgets and savings stored in a GGUF")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LexiError as e:
        print(f"lexi-gguf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lexi-gguf: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
