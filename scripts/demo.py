#!/usr/bin/env python3
"""`make demo`: the main job on the built-in default model.

train (or load cached) -> profile + allocate + convert + quantize (Q8_0) -> chat one prompt ->
bench and eval full / uniform / lexi -> one summary table, with the paths of the JSON and PNG files.
"""
from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lexi_gguf import LexiError  # noqa: E402

OUT = ROOT / "out" / "demo"
BUDGETS = [0.75, 0.5]


def main() -> int:
    from lexi_gguf.bench import bench, plot as bench_plot, table as bench_table
    from lexi_gguf.chat import chat
    from lexi_gguf.convert import convert
    from lexi_gguf.default_model import ensure_default_model
    from lexi_gguf.evaluate import cross_check, evaluate, pareto_plot, table as eval_table
    from lexi_gguf.gguf_io import sensitivity_from_gguf, model_info
    from lexi_gguf.plots import sensitivity_heatmap

    t0 = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    print("== 1. default model (trained here on Python's own docs; a testbed, not a product claim)")
    model_dir = ensure_default_model()
    print(f"   {model_dir}")

    print("\n== 2. profile, allocate, convert and quantize (llama.cpp's converter and quantizer)")
    gguf = OUT / "default-moe-Q8_0.gguf"
    convert(model_dir, gguf, budget=0.75, budgets=[1.0, *BUDGETS], quant="Q8_0", threads=2, force=True)
    info = model_info(gguf)
    sens = sensitivity_from_gguf(info)
    plan = {"expert_used_count": list(info.lexi["lexi.expert_used_count"]), "total": int(info.lexi["lexi.total"])}
    heat = sensitivity_heatmap(dict(sens, arch="default model"), OUT / "sensitivity.png", plan)

    print("\n== 3. chat (one prompt, lexi budget 0.75)")
    prompt = "What does the len() function return?"
    print(f"> {prompt}")
    chat(gguf, budget=0.75, threads=2, max_tokens=48, temperature=0.0, n_ctx=512, stdin=io.StringIO(prompt + "\n"))

    print("\n== 4. bench: full vs uniform (--override-kv) vs lexi, 2 threads")
    b = bench(gguf, BUDGETS, n_prompt=256, n_gen=256, reps=5, threads=2)
    print(bench_table(b))
    (OUT / "bench.json").write_text(json.dumps(b, indent=2))
    bench_plot(b, OUT / "bench.png")

    print("\n== 5. eval: perplexity and KL divergence vs the full model on held-out text")
    text_file = model_dir / "eval.txt"
    e = evaluate(gguf, text_file.read_text(), BUDGETS, ctx=256, threads=2)
    e["llama_perplexity"] = cross_check(gguf, text_file, 256, 2, e["chunks"])
    print(eval_table(e))
    print(f"cross-check: llama-perplexity PPL {e['llama_perplexity']['ppl']:.4f}, ours {e['rows'][0]['ppl']:.4f}")
    (OUT / "eval.json").write_text(json.dumps(e, indent=2))
    pareto_plot(e, OUT / "pareto.png", b)

    print("\n== summary (this machine: "
          f"{b['machine']['cpu']}, {b['machine']['cores']} cores, {b['backend']}, 2 threads)")
    lines = ["| config | budget | avg k | pp256 t/s | tg256 t/s | tg speed-up | ideal | PPL | mean KLD | same top-1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rb, re_ in zip(b["rows"], e["rows"]):
        lines.append(f"| {rb['config']} | {rb['budget']:g} | {rb['avg_k']:.2f} | {rb['pp_tps']:.0f} | {rb['tg_tps']:.1f} | "
                     f"{rb['tg_speedup']:.2f}x | {rb['ideal_speedup']:.2f}x | {re_['ppl']:.3f} | {re_['kld_mean']:.4f} | "
                     f"{re_['same_top1']:.3f} |")
    summary = "\n".join(lines)
    print(summary)
    for bud in BUDGETS:
        u = next(r for r in e["rows"] if r["config"] == "uniform" and r["budget"] == bud)
        lx = next(r for r in e["rows"] if r["config"] == "lexi" and r["budget"] == bud)
        print(f"budget {bud:g}: lexi mean KLD / uniform = {lx['kld_mean'] / max(u['kld_mean'], 1e-12):.2f}")
    (OUT / "summary.md").write_text(summary + "\n")
    print("\nfiles:")
    for p in (gguf, heat, OUT / "bench.json", OUT / "bench.png", OUT / "eval.json", OUT / "pareto.png", OUT / "summary.md"):
        print(f"  {p.relative_to(ROOT)}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LexiError as err:
        print(f"lexi-gguf: error: {err}", file=sys.stderr)
        sys.exit(2)
