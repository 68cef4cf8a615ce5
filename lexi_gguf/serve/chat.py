"""`lexi-gguf chat`: streaming local chat through llama-cpp-python with the GGUF's chat template,
at a stored budget, the file's default, or with lexi switched off; `/budget X` switches in place
(one model load). Works with piped stdin. `continue_text`: what a base model (no chat training, such as
the built-in testbed) can show, a text of the kind it was trained on continued, sampled."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .. import LexiError
from ..runtime.budgets import DEFAULT, FULL, resolve, run_budget
from ..gguf.reader import model_info
from ..runtime.llama import load


def switch_budget(llm, info, args: list[str], current, name: str, stdout):
    """`/budget` shows the running budget, `/budget 0.5` / `/budget full` / `/budget default` switch
    in place (one model load; the conversation is re-read at the new budget on the next answer)."""
    if args:
        try:
            new = resolve(info, args[0], name)
            run_budget(llm, new)
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
    spec = FULL if no_lexi else DEFAULT if budget is None else budget if isinstance(budget, str) else f"{budget:g}"
    current = resolve(info, spec, Path(path).name)
    llm = load(path, options=options, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=n_gpu_layers, seed=seed,
               prefetch=prefetch)
    run_budget(llm, current)   # the file's counts stay loaded; the context runs the chosen row
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


def degenerate(ids: list[int]) -> bool:
    """Whether a continuation only repeats itself: one token is half of it or more (`| | | ...`), or it is
    a loop of a few (`_ If the_ If the ...`: under one distinct token in four)."""
    if len(ids) < 8:
        return False
    top = max(ids.count(t) for t in set(ids))
    return top * 2 >= len(ids) or len(set(ids)) * 4 < len(ids)


def continue_text(path, prompt: str, *, budget=None, options=None, max_tokens=64, n_ctx=512, temperature=0.8,
                  top_k=40, top_p=0.95, repeat_penalty=1.1, seed=0, stdout=None) -> dict:
    """Continue `prompt` as plain text (no chat template: a base model was never trained on one), streamed
    to stdout, at a stored budget (or the file's default). Sampled at `temperature` from the `top_k` /
    `top_p` most likely tokens with a repeat penalty, by llama.cpp's sampler seeded with `seed`: the same
    text on every run. Greedy decoding of a small model falls into a loop of one token.

    Returns the prompt, the text, its token ids, speed and the model's parameter count
    (llama_model_n_params of the loaded model)."""
    import llama_cpp
    stdout = stdout or sys.stdout
    info = model_info(path)
    current = resolve(info, f"{budget:g}" if budget is not None else DEFAULT, Path(path).name)
    llm = load(path, options=options, n_ctx=n_ctx, seed=seed)
    run_budget(llm, current)
    t0 = time.perf_counter()
    first, pieces = None, []
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                       top_p=top_p, repeat_penalty=repeat_penalty, seed=seed, stream=True):
        piece = chunk["choices"][0]["text"]
        if piece:
            first = first or time.perf_counter()
            pieces.append(piece)
            stdout.write(piece)
            stdout.flush()
    t1 = time.perf_counter()
    text = "".join(pieces)
    # the continuation's own tokens: the prompt and the prompt with it, tokenized, differ by them
    whole = llm.tokenize((prompt + text).encode(), add_bos=False)
    ids = whole[len(llm.tokenize(prompt.encode(), add_bos=False)):]
    n_params = int(llama_cpp.llama_model_n_params(llm.model))
    llm.close()
    gen_s = t1 - (first or t1)
    return {"prompt": prompt, "text": text, "tokens": ids, "budget": current.name, "n_params": n_params,
            "tok_per_s": (len(ids) - 1) / gen_s if len(ids) > 1 and gen_s > 0 else float("nan"),
            "first_token_s": (first or t1) - t0}
