#!/usr/bin/env python3
"""Expert caching (issue 9): on the built-in caching testbed (64 experts, k 8, 8 layers, trained here),
held-out prompts + sampled generation are traced from the runtime at full k, LExI 0.75 / 0.5 and uniform
k of equal budget; the look-ahead predictors (router baseline; a small learned one, trained on traces
of a disjoint prompt set) are scored; every trace is replayed through LRU, LFU,
Belady (offline optimum) and prefetching caches. Also: what tracing costs over a plain eval.

Targets (issue 9), at 10 % capacity: predictor prefetch >= 3x LRU and >= 0.85x Belady; LExI 0.75 raises
every policy over full and uniform. Results: bench/results/caching-<machine id>.json (+ .png). --quick:
4 prompts of 8 tokens, a 20 k-request simulator check.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python bench/bench_caching.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as C  # noqa: E402


def trace_cost(gguf: Path, prompts: list[str], threads: int) -> dict:
    """Seconds to evaluate the same token lists plainly and while tracing (with router inputs)."""
    from lexi_gguf.runtime.trace import record
    from lexi_gguf.runtime.llama import load
    llm = load(gguf, n_ctx=1024, n_threads=threads, logits_all=True)
    seqs = [llm.tokenize(p.encode(), add_bos=True) for p in prompts]
    t0 = time.perf_counter()
    for s in seqs:
        llm.reset()
        llm.eval(s)
    plain = time.perf_counter() - t0
    llm.close()
    tr = record(gguf, tokens=seqs, hidden=True, threads=threads, progress=False)
    return {"plain_seconds": plain, "trace_seconds": tr.meta["seconds"], "ratio": tr.meta["seconds"] / plain,
            "tokens": int(len(tr.tokens))}


def simulator_speed(events: int = 1_000_000) -> dict:
    """Seconds to replay ~1 M (token, layer, expert) requests: 16 k tokens x 8 layers x k 8."""
    import numpy as np

    from lexi_gguf.caching import simulate as S
    from lexi_gguf.runtime.trace import Trace
    T, L, k, E = events // 64, 8, 8, 64
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, E + 1)
    ex = np.stack([[rng.choice(E, k, replace=False, p=p / p.sum()) for _ in range(L)] for _ in range(T)]).astype(np.int16)
    tr = Trace(np.zeros(T, np.int32), np.ones(T, bool), np.zeros(T, np.int32), np.arange(L, dtype=np.int32),
               np.full(L, k, np.int32), ex, np.ones(ex.shape, np.float32), meta={"n_expert": E})
    out = {"events": int(T * L * k)}
    for pol in ("lru", "belady"):
        t0 = time.perf_counter()
        S.simulate(tr, 0.1, pol)
        out[f"{pol}_seconds"] = time.perf_counter() - t0
    return out


def main() -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--work", default=str(C.WORK))
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=int, default=32,
                    help="tokens generated after each prompt (default 32)")
    ap.add_argument("--depth", type=int, default=2)
    args = ap.parse_args()
    events = 1_000_000
    if args.quick:
        args.prompts, args.max_tokens, events = 4, 8, 20_000
    run = C.Run(args, "caching")
    from lexi_gguf.caching import experiment as X
    from lexi_gguf.testbeds.builtin import ensure_default_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gguf = X.testbed_gguf(work)
    model_dir = ensure_default_model(name="caching")
    prompts = X.held_out_prompts(model_dir, args.prompts)
    train_prompts = X.held_out_prompts(model_dir, 2 * args.prompts, offset=args.prompts)    # disjoint
    res = X.run(gguf, prompts, train_prompts, max_new_tokens=args.max_tokens, depth=args.depth,
                threads=args.threads)
    print(X.tables(res))
    print()
    print(X.clock_table(res))
    res["trace_cost"] = cost = trace_cost(gguf, prompts, args.threads)
    print(f"\ntracing cost: {cost['trace_seconds']:.2f} s vs plain eval {cost['plain_seconds']:.2f} s "
          f"({cost['ratio']:.2f}x) on {cost['tokens']} tokens")
    res["simulator_speed"] = speed = simulator_speed(events)
    print(f"simulator: {speed['events'] / 1e6:.2f} M requests in {speed['lru_seconds']:.1f} s (LRU), "
          f"{speed['belady_seconds']:.1f} s (Belady)")
    t = X.targets(res)
    res["targets"] = {k: v for k, v in t.items() if k != "met"}
    res["targets_met"] = dict(t["met"], **{"trace cost <= 2x plain eval": cost["ratio"] <= 2.0,
                                           "1 M requests simulated in < 10 s": max(speed["lru_seconds"], speed["belady_seconds"]) < 10})
    run.save(res)
    print(f"plot -> {X.plot(res, run.png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
