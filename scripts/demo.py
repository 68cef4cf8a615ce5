#!/usr/bin/env python3
"""`make demo`: the main job on the built-in default model.

train (or load cached) -> profile + allocate + convert + quantize (Q8_0) -> the model continues a
held-out passage of its docs (sampled) -> bench and eval full / uniform / lexi -> one summary table, with the paths of the JSON and PNG files;
then expert caching on the same model: trace, predict, simulate (free transfers and on a clock). The
64-expert caching study is `bench/bench_caching.py` on its own testbed (a second trained model: ~5 min
of training a cold `make demo` does not pay).

Every stage runs in a child process (`demo.py --stage NAME`) and writes out/demo/<stage>.json as soon
as it finishes, so a stage that fails (an error, or native code killed by a signal) loses nothing
that came before it: the rest go on where they can, and the end names each failure and its cause
(exit status non-zero). LEXI_DEMO_CRASH=STAGE[,STAGE] makes those stages die of SIGSEGV (the test of all this).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lexi_gguf import LexiError  # noqa: E402

OUT = Path(os.environ.get("LEXI_DEMO_OUT", ROOT / "out" / "demo"))
GGUF = OUT / "default-moe-Q8_0.gguf"
BUDGETS = [0.75, 0.5]
THREADS = 2


def _save(stage: str, obj: dict) -> Path:
    p = OUT / f"{stage}.json"
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(p)
    return p


def _model_dir() -> Path:
    return Path(json.loads((OUT / "model.json").read_text())["model_dir"])


def stage_model() -> dict:
    from lexi_gguf.testbeds.builtin import ensure_default_model
    model_dir = ensure_default_model()
    print(f"   {model_dir}")
    return {"model_dir": str(model_dir)}


def stage_convert() -> dict:
    from lexi_gguf.export.convert import convert
    from lexi_gguf.gguf.reader import model_info, sensitivity_from_gguf
    from lexi_gguf.measure.plots import sensitivity_heatmap
    convert(_model_dir(), GGUF, budget=0.75, budgets=[1.0, *BUDGETS], quant="Q8_0", threads=THREADS, force=True)
    info = model_info(GGUF)
    plan = {"expert_used_count": list(info.lexi["lexi.expert_used_count"]), "total": int(info.lexi["lexi.total"])}
    heat = sensitivity_heatmap(dict(sensitivity_from_gguf(info), arch="default model"), OUT / "sensitivity.png", plan)
    return {"gguf": str(GGUF), "heatmap": str(heat), **plan}


# The built-in model is a base model of a few M parameters trained for minutes on docs text: asked a
# question through a chat template ("Question: ...\nAnswer:", a format and a newline token it never saw:
# SentencePiece's normalisation made every newline of its corpus a space) and decoded greedily, it
# loops on a token or three ("| | | ...", "_ If the_ If the ..."). What it can show is its training
# distribution: the start of a held-out passage, in the form it read text, continued with seeded sampling.
SAMPLING = {"temperature": 0.7, "top_k": 40, "top_p": 0.95, "repeat_penalty": 1.1, "seed": 0}
PROMPT_WORDS = 16


def held_out_prompt(text: str, words: int = PROMPT_WORDS) -> tuple[str, str]:
    """The first `words` words of the first prose paragraph (a letter first, at least twice as many words)
    of the held-out text, whitespace collapsed as the tokenizer's normalisation did to the training text;
    and the `words` words that follow them there."""
    for para in text.split("\n\n"):
        w = para.split()
        if para[:1].isalpha() and len(w) >= 2 * words:
            return " ".join(w[:words]), " ".join(w[words:2 * words])
    raise LexiError("the held-out text has no paragraph of prose to start a continuation from")


def model_line(gguf: Path, recipe: dict) -> str:
    """What the model is, in one line: its parameter count (from the file's tensors), shape and training."""
    from lexi_gguf.gguf.reader import open_reader
    n_params = sum(int(t.n_elements) for t in open_reader(gguf).tensors)
    trained = f"{recipe['seconds'] / 60:.0f} min" if recipe.get("seconds", 0) >= 90 else f"{recipe.get('seconds', '?')} s"
    return (f"the model: a {n_params / 1e6:.1f} M-parameter {recipe['arch']} MoE testbed ({recipe['layers']} layers x "
            f"{recipe['experts']} experts, top-{recipe['k']}, {recipe['vocab']}-token vocabulary), trained here for "
            f"{trained} ({recipe['steps']} steps) on Python's own docs: it continues such text, it does not answer "
            "questions")


def chat_demo(gguf: Path, prompt: str, original: str, recipe: dict, budget: float = 0.75) -> dict:
    """The model continues `prompt` at a lexi budget, sampled (SAMPLING); a continuation that is one
    token repeated (or a loop of a few) is an error, not a demo."""
    from lexi_gguf.runtime.options import LoadOptions
    from lexi_gguf.serve.chat import continue_text, degenerate
    print(model_line(gguf, recipe))
    print(f"prompt (the start of a held-out passage): {prompt}")
    print("continuation (" + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in SAMPLING.items()) + "):")
    out = continue_text(gguf, prompt, budget=budget, options=LoadOptions(threads=THREADS), max_tokens=48,
                        n_ctx=512, **SAMPLING)
    print(f"\n[{len(out['tokens'])} tokens, {out['tok_per_s']:.0f} tok/s at budget {out['budget']}]")
    print(f"the held-out passage goes on: {original} ...")
    if degenerate(out["tokens"]):
        raise LexiError(f"the continuation repeats itself ({out['text'][:80]!r}): sampling or prompt broken")
    return {**out, "original": original, "sampling": SAMPLING, "recipe": recipe}


def stage_chat() -> dict:
    model_dir = _model_dir()
    prompt, original = held_out_prompt((model_dir / "eval.txt").read_text())
    return chat_demo(GGUF, prompt, original, json.loads((model_dir / "recipe.json").read_text()))


def stage_bench() -> dict:
    from lexi_gguf.measure.bench import bench, plot, table
    b = bench(GGUF, BUDGETS, n_prompt=256, n_gen=256, reps=5, threads=THREADS)
    print(table(b))
    plot(b, OUT / "bench.png")
    return b


def stage_eval() -> dict:
    from lexi_gguf.measure.evaluate import cross_check, evaluate, table
    text_file = _model_dir() / "eval.txt"
    e = evaluate(GGUF, text_file.read_text(), BUDGETS, ctx=256, threads=THREADS)
    e["llama_perplexity"] = cross_check(GGUF, text_file, 256, THREADS, e["chunks"])
    print(table(e))
    print(f"cross-check: llama-perplexity PPL {e['llama_perplexity']['ppl']:.4f}, ours {e['rows'][0]['ppl']:.4f}")
    return e


def stage_caching() -> dict:
    from lexi_gguf.caching import experiment as X
    model_dir = _model_dir()
    prompts, train_prompts = X.held_out_prompts(model_dir, 12), X.held_out_prompts(model_dir, 24, offset=12)
    res = X.run(GGUF, prompts, train_prompts, budgets=BUDGETS, max_new_tokens=24, depth=2, threads=THREADS)
    print(X.tables(res))
    print()
    print(X.clock_table(res))
    res["plot"] = X.plot(res, OUT / "caching.png")
    return res


# name, title, function, stages whose output it needs
STAGES = [
    ("model", "1. default model (trained here on Python's own docs; a testbed, not a product claim)", stage_model, []),
    ("convert", "2. profile, allocate, convert and quantize (llama.cpp's converter and quantizer)", stage_convert, ["model"]),
    ("chat", "3. chat: the model continues a held-out passage of its docs (lexi budget 0.75, sampled)", stage_chat,
     ["model", "convert"]),
    ("bench", f"4. bench: full vs uniform (--override-kv) vs lexi, {THREADS} threads", stage_bench, ["convert"]),
    ("eval", "5. eval: perplexity and KL divergence vs the full model on held-out text", stage_eval, ["model", "convert"]),
    ("caching", "6. expert caching: trace -> look-ahead predictors -> cache simulation (free and on a clock)",
     stage_caching, ["model", "convert"]),
]


def run_stage_child(name: str) -> str | None:
    """Run one stage in a child process, echoing its output; None on success, else the cause."""
    from lexi_gguf.runtime.procs import exit_cause
    last: collections.deque[str] = collections.deque(maxlen=3)
    p = subprocess.Popen([sys.executable, __file__, "--stage", name], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in p.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if line.strip():
            last.append(line.strip())
    p.wait()
    if p.returncode == 0 and (OUT / f"{name}.json").exists():
        return None
    cause = exit_cause(p.returncode) if p.returncode != 0 else f"wrote no {name}.json"
    return f"{cause}; last output: {' / '.join(last) or '(none)'}"


def run_stages(stages, run) -> tuple[dict[str, str], dict[str, float]]:
    """Run each stage (run(name) -> None or the cause of its failure) in order; a stage whose needs
    failed is skipped, the others go on. Returns (failed name -> cause, name -> seconds)."""
    failed: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for name, title, _, needs in stages:
        print(f"\n== {title}", flush=True)
        missing = [n for n in needs if n in failed]
        if missing:
            failed[name] = f"skipped: needs {', '.join(missing)}"
            print(f"   {failed[name]}")
            continue
        t_stage = time.perf_counter()
        cause = run(name)
        seconds[name] = time.perf_counter() - t_stage
        if cause:
            failed[name] = cause
            print(f"   stage {name} FAILED: {cause}", flush=True)
    return failed, seconds


def summary(failed: dict[str, str]) -> None:
    from lexi_gguf.runtime.cpu import machine
    b = json.loads((OUT / "bench.json").read_text()) if (OUT / "bench.json").exists() else None
    e = json.loads((OUT / "eval.json").read_text()) if (OUT / "eval.json").exists() else None
    m = (b or {}).get("machine") or machine()
    print(f"\n== summary (this machine: {m['cpu']} [{m.get('cpu_class', '?')}], {m['cores']} cores, CPU, {THREADS} threads)")
    rows = (b or e or {}).get("rows", [])
    lines = ["| config | budget | avg k | pp256 t/s | tg256 t/s | tg speed-up | ideal | PPL | mean KLD | same top-1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        rb = b["rows"][i] if b else None
        re_ = e["rows"][i] if e else None
        perf = (f"{rb['pp_tps']:.0f} | {rb['tg_tps']:.1f} | {rb['tg_speedup']:.2f}x | {rb['ideal_speedup']:.2f}x"
                if rb else "- | - | - | -")
        qual = f"{re_['ppl']:.3f} | {re_['kld_mean']:.4f} | {re_['same_top1']:.3f}" if re_ else "- | - | -"
        lines.append(f"| {r['config']} | {r['budget']:g} | {r['avg_k']:.2f} | {perf} | {qual} |")
    text = "\n".join(lines)
    print(text)
    if e:
        for bud in BUDGETS:
            u = next(r for r in e["rows"] if r["config"] == "uniform" and r["budget"] == bud)
            lx = next(r for r in e["rows"] if r["config"] == "lexi" and r["budget"] == bud)
            print(f"budget {bud:g}: lexi mean KLD / uniform = {lx['kld_mean'] / max(u['kld_mean'], 1e-12):.2f}")
    (OUT / "summary.md").write_text(text + "\n" + "".join(f"\nFAILED {k}: {v}" for k, v in failed.items()))
    print("\nfiles:")
    for p in (GGUF, OUT / "sensitivity.png", *(OUT / f"{s[0]}.json" for s in STAGES), OUT / "bench.png",
              OUT / "pareto.png", OUT / "caching.png", OUT / "summary.md"):
        if p.exists():
            print(f"  {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}")


def main() -> int:
    t0 = time.perf_counter()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, *_ in STAGES:   # results of an earlier run must not pass for this one's
        (OUT / f"{name}.json").unlink(missing_ok=True)
    failed, seconds = run_stages(STAGES, run_stage_child)
    if (OUT / "eval.json").exists():
        from lexi_gguf.measure.evaluate import pareto_plot
        b = json.loads((OUT / "bench.json").read_text()) if (OUT / "bench.json").exists() else None
        pareto_plot(json.loads((OUT / "eval.json").read_text()), OUT / "pareto.png", b)
    summary(failed)
    print("\nstage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    if failed:
        print("\nFAILED stages (results of the others are kept above):", file=sys.stderr)
        for k, v in failed.items():
            print(f"  {k}: {v}", file=sys.stderr)
        return 1
    return 0


def run_one(name: str) -> int:
    fn = next(f for n, _, f, _ in STAGES if n == name)
    if name in os.environ.get("LEXI_DEMO_CRASH", "").split(","):
        os.kill(os.getpid(), signal.SIGSEGV)
    try:
        _save(name, fn())
    except LexiError as err:
        print(f"lexi-gguf: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=[s[0] for s in STAGES], help="run one stage in this process")
    args = ap.parse_args()
    sys.exit(run_one(args.stage) if args.stage else main())
