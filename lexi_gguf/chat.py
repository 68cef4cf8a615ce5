"""`lexi-gguf chat`: streaming local chat through llama-cpp-python with the GGUF's chat template,
at a stored budget, the file's default, or with lexi switched off. Works with piped stdin."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from . import LexiError
from .gguf_io import model_info, read_ladder
from .runtime import lexi_overrides, load


def find_budget(rows: list[dict], budget: float, name: str) -> dict:
    """The ladder row of a stored budget; a budget that is not stored is an error listing those that are."""
    for r in rows:
        if abs(r["budget"] - budget) < 1e-3:
            return r
    have = ", ".join(f"{r['budget']:g}" for r in rows) or "none"
    raise LexiError(f"budget {budget:g} is not stored in {name} (stored budgets: {have}); "
                    "pick one of those or rewrite the file with `lexi-gguf apply --budgets ...`")


def budget_index(path: str | Path, budget: float) -> int:
    return find_budget(read_ladder(model_info(path)), budget, Path(path).name)["index"]


def overrides_for(path, *, budget: float | None = None, no_lexi: bool = False) -> dict:
    if budget is not None and no_lexi:
        raise LexiError("--budget and --no-lexi exclude each other")
    if no_lexi:
        return lexi_overrides(lexi=False)
    if budget is not None:
        return lexi_overrides(budget_index=budget_index(path, budget))
    return {}


def chat(path, *, budget=None, no_lexi=False, n_gpu_layers=0, threads=None, max_tokens=256, n_ctx=2048,
         temperature=0.7, seed=0, stdin=None, stdout=None) -> list[dict]:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    kv = overrides_for(path, budget=budget, no_lexi=no_lexi)
    llm = load(path, kv_overrides=kv, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=n_gpu_layers, seed=seed)
    interactive = stdin.isatty()
    messages: list[dict] = []
    stats = []
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        messages.append({"role": "user", "content": text})
        t0 = time.perf_counter()
        first = None
        n_tok = 0
        answer = []
        for chunk in llm.create_chat_completion(messages=messages, stream=True, max_tokens=max_tokens,
                                                temperature=temperature, seed=seed):
            delta = chunk["choices"][0]["delta"].get("content")
            if delta:
                if first is None:
                    first = time.perf_counter()
                n_tok += 1
                answer.append(delta)
                stdout.write(delta)
                stdout.flush()
        t1 = time.perf_counter()
        messages.append({"role": "assistant", "content": "".join(answer)})
        gen_s = t1 - (first or t1)
        tps = (n_tok - 1) / gen_s if n_tok > 1 and gen_s > 0 else float("nan")
        stats.append({"tokens": n_tok, "tok_per_s": tps, "first_token_s": (first or t1) - t0})
        stdout.write(f"\n[{n_tok} tokens, {tps:.1f} tok/s, first token {(first or t1) - t0:.2f} s]\n")
        stdout.flush()
    return stats
