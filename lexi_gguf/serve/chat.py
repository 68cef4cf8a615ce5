"""`lexi-gguf chat`: streaming local chat through llama-cpp-python with the GGUF's chat template,
at a stored budget, the file's default, or with lexi switched off; `/budget X` switches in place
(one model load). Works with piped stdin."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .. import LexiError
from ..runtime.budgets import DEFAULT, FULL, resolve
from ..gguf.reader import model_info
from ..runtime.llama import load, set_lexi_row


def switch_budget(llm, info, args: list[str], current, name: str, stdout):
    """`/budget` shows the running budget, `/budget 0.5` / `/budget full` / `/budget default` switch
    in place (one model load; the conversation is re-read at the new budget on the next answer)."""
    if args:
        try:
            new = resolve(info, args[0], name)
            set_lexi_row(llm, new.row)
            current = new
        except LexiError as e:
            stdout.write(f"[{e}]\n")
    n_moe = sum(1 for k in current.counts if k)
    stdout.write(f"[budget {current.name}: k per layer {current.counts}, avg k {sum(current.counts) / max(n_moe, 1):.2f}]\n")
    stdout.flush()
    return current


def chat(path, *, budget=None, no_lexi=False, options=None, n_gpu_layers=None, threads=None, max_tokens=256,
         n_ctx=2048, temperature=0.7, seed=0, stdin=None, stdout=None, prefetch: str | None = None) -> list[dict]:
    """options: how the model is loaded (runtime.options.LoadOptions); n_gpu_layers, threads, prefetch:
    its fields one by one (a value given wins)."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    if budget is not None and no_lexi:
        raise LexiError("--budget and --no-lexi exclude each other")
    info = model_info(path)
    current = resolve(info, FULL if no_lexi else f"{budget:g}" if budget is not None else DEFAULT, Path(path).name)
    llm = load(path, options=options, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=n_gpu_layers, seed=seed,
               prefetch=prefetch)
    set_lexi_row(llm, current.row)   # the file's counts stay loaded; the context runs the chosen row
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
        if text.split()[0] == "/budget":
            current = switch_budget(llm, info, text.split()[1:], current, Path(path).name, stdout)
            continue
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
