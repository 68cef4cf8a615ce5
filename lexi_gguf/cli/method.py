"""`profile` (Stage 1) and `allocate` (Stage 2) on a Hugging Face checkpoint."""
from __future__ import annotations

from pathlib import Path

from .. import read_json
from ..method.profile import DEFAULT_DRAW_TOKENS, DEFAULT_SAMPLES
from .common import add_alloc_opts, add_calib_opts, allowed_k, budget_fraction, calib_text, path, write_json


def _calibrated(args, src, **profile_kw) -> dict | None:
    """--calib on `profile`: the table measured with --calib-model, or with a temporary conversion."""
    text = calib_text(args)
    if text is None:
        return None
    import tempfile

    from ..method.calib import calibrated_sensitivity

    def run(gguf_path):
        return calibrated_sensitivity(gguf_path, src, text, metric=args.calib_metric, tokens=args.calib_tokens,
                                      threads=args.threads, samples=args.samples, seed=args.seed, **profile_kw)
    if args.calib_model or args.model_dir.is_file():      # a GGUF reads the text itself
        return run(args.calib_model or args.model_dir)
    from ..runtime.build import llama_cpp_dir
    from ..export.hf_to_gguf import convert_to_gguf
    out_dir = Path(args.output).resolve().parent
    with tempfile.TemporaryDirectory(prefix=".calib.", dir=out_dir) as tmp:
        print("converting a temporary GGUF to read the calibration text (pass --calib-model to reuse one)", flush=True)
        return run(convert_to_gguf(args.model_dir, Path(tmp) / "calib.gguf", llama_cpp_dir(), outtype="auto"))


def cmd_profile(args) -> None:
    from ..method.profile import profile
    opts = dict(device=args.device, draw_tokens=args.draw_tokens, dtype=args.compute_dtype)
    if args.model_dir.is_file():      # a GGUF as downloaded (the first shard of a split set): its own weights
        from ..method.gguf_weights import GGUFSource
        src = GGUFSource(args.model_dir)
    else:
        from ..method.weights import SafetensorsSource
        src = SafetensorsSource(args.model_dir)
    sens = _calibrated(args, src, **opts)
    if sens is None:
        sens = profile(src, samples=args.samples, seed=args.seed, threads=args.threads, input_mode=args.input, **opts)
    if hasattr(src, "types"):
        sens["source"] = "gguf:" + "+".join(src.types)         # as `apply` records it
    write_json(sens, args.output)
    t = sens["timing"]
    rate = f" ({t['gflop_per_s']:.0f} GFLOP/s)" if "gflop_per_s" in t else ""
    print(f"profiled {len(src.model.moe_layers)} MoE layers of {sens['arch']} (k_base {sens['k_base']}, "
          f"{sens['n_expert']} experts) in {t['seconds']:.1f} s{rate} -> {args.output}")
    if args.plot:
        from ..measure.plots import sensitivity_heatmap
        print(f"heatmap -> {sensitivity_heatmap(sens, args.plot)}")


def cmd_allocate(args) -> None:
    from ..method.allocate import TABLE_FIX, allocate
    sens = read_json(args.sensitivity, TABLE_FIX)
    plan = allocate(sens, budget=budget_fraction(args.budget), total=args.total, avg_k=args.avg_k, solver=args.solver,
                    allowed_k=allowed_k(args), min_k=args.min_k, seed=args.seed, compare=args.compare)
    write_json(plan, args.output)
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


def register(sub) -> None:
    p = sub.add_parser("profile", help="Stage 1: data-free per-layer sensitivity of a HF checkpoint or a GGUF")
    p.add_argument("model_dir", type=Path, metavar="MODEL", help="a Hugging Face checkpoint folder, or a GGUF file")
    p.add_argument("-o", "--output", type=path, required=True)
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
    p.add_argument("--calib-model", type=path, metavar="GGUF", help="with --calib: a GGUF of the same model to read the text with "
                   "(default: a temporary conversion of MODEL_DIR)")
    p.add_argument("--plot", type=path, help="also write a PNG heatmap here")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("allocate", help="Stage 2: per-layer k under a total budget")
    p.add_argument("sensitivity")
    p.add_argument("-o", "--output", type=path, required=True)
    add_alloc_opts(p, True)
    p.add_argument("--compare", action="store_true", help="also run the other solver and report both objectives")
    p.add_argument("--plot", type=path, help="heatmap PNG with the chosen k marked")
    p.set_defaults(func=cmd_allocate)
