#!/usr/bin/env python3
"""Serving many clients (issue 21): `lexi-gguf serve` (python engine: one llama-cpp-python model,
requests queued) against `serve --engine llama-server` (llama.cpp's server: parallel slots, continuous
batching), both at the same budget of the built-in default model (Q8_0), on loopback.

For 1, 4 and 16 concurrent clients: a fixed number of completions (sampled, 32 tokens) within a time
limit; requests/s, tokens/s, p50/p99 latency, failed and lost requests, the server tree's PSS after
the load and peak RSS. The python engine runs at --threads = cores and = cores - 1. Beside the 4-client load: a body that is not JSON, a prompt ~8x the context and a client
that stalls mid-request (what they got is saved; the load beside them must lose nothing). Then the
memory of llama-server's router mode holding every stored budget (one child each, weights shared).
Results: bench/results/serve-load-<machine id>.json and .png. --quick: 1 and 4 clients, 8 requests of
8 tokens, one python engine and llama-server (its first use builds it, ~3 min).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python bench/bench_serve_load.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as C  # noqa: E402

KEY = "bench-key"


def start(model: Path, engine: str, args, budget: str | None, threads: int) -> tuple[subprocess.Popen, str]:
    from bench import loadgen as load
    port = load.free_port()
    cmd = [sys.executable, "-m", "lexi_gguf.cli", "serve", str(model), "--port", str(port), "--ctx", str(args.ctx),
           "--threads", str(threads), "--api-key", KEY, *(["--budget", budget] if budget else [])]
    if engine == "llama-server":
        cmd += ["--engine", "llama-server", "--parallel", str(args.parallel)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    load.wait_until_serving(proc, base, KEY, timeout=300)
    return proc, base


def main() -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--work", default=str(C.WORK))
    ap.add_argument("--parallel", type=int, default=4, help="llama-server slots")
    ap.add_argument("--ctx", type=int, default=512, help="context per request / slot")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--time-limit", type=float, default=300.0)
    args = ap.parse_args()
    if args.quick:
        args.clients, args.requests, args.max_tokens = "1,4", 8, 8
    run = C.Run(args, "serve-load")
    from bench import loadgen as load
    from bench.models import default_gguf
    from lexi_gguf.caching.experiment import held_out_prompts
    from lexi_gguf.testbeds.builtin import ensure_default_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gguf = default_gguf(work, args.threads)
    prompts = held_out_prompts(ensure_default_model(), 16)
    model_id = f"{gguf.stem}@0.75"
    clients = [int(c) for c in args.clients.split(",")]
    rows = []
    # the python engine also at one thread less than the cores: its event loop needs a core (docs/serving.md)
    engines = [("python", args.threads), ("python", args.threads - 1), ("llama-server", args.threads)]
    if args.quick:
        engines = [("python", max(1, args.threads - 1)), ("llama-server", args.threads)]
    for engine, threads in [e for e in engines if e[1] >= 1]:
        proc, base = start(gguf, engine, args, "0.75", threads)
        try:
            load.completion(base, model_id, prompts[0], 4, KEY, 60)      # warm-up
            for c in clients:
                beside = (lambda: load.misbehave(base, model_id, KEY, args.ctx)) if c == 4 else None
                r = load.run_load(base, model_id, prompts, clients=c, requests=args.requests, max_tokens=args.max_tokens,
                                  time_limit=args.time_limit, key=KEY, pid=proc.pid, beside=beside)
                r["engine"], r["threads"] = f"{engine} t{threads}", threads
                rows.append(r)
                print(load.table([r]).splitlines()[-1], flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    proc, base = start(gguf, "llama-server", args, None, args.threads)        # router: every stored budget
    try:
        router = load.tree_memory_mib(proc.pid)
        ids = [m["id"] for m in load.models(base, KEY)]
        for mid in ids:
            load.completion(base, mid, prompts[0], 8, KEY, 60)
        router.update(budgets_served=ids, after_one_request_each=load.tree_memory_mib(proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print()
    print(load.table(rows))
    print(f"\nllama-server router mode, {len(ids)} model ids (one child each): PSS {router['pss_mib']:.0f} MiB, "
          f"RSS {router['rss_mib']:.0f} MiB (RSS counts the shared weights once per child)")
    targets = {"no failed or lost request at any load": all(r["failed"] == 0 and r["lost"] == 0 for r in rows)}
    res = {"model": str(gguf), "model_id": model_id, "threads": args.threads,
           "parallel": args.parallel, "ctx": args.ctx, "requests": args.requests, "max_tokens": args.max_tokens,
           "rows": rows, "router": router, "targets_met": targets}
    run.save(res)
    plt = C.pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for engine in dict.fromkeys(r["engine"] for r in rows):
        rs = [r for r in rows if r["engine"] == engine]
        ax[0].plot([r["clients"] for r in rs], [r["tokens_per_s"] for r in rs], "o-", label=engine)
        ax[1].plot([r["clients"] for r in rs], [r["p99_s"] for r in rs], "o-", label=engine)
    for a, lab in zip(ax, ("tokens/s (all clients)", "p99 latency, s")):
        a.set_xscale("log", base=2)
        a.set_xlabel("concurrent clients")
        a.set_ylabel(lab)
        a.legend(fontsize=8)
    fig.suptitle(f"serving the default model at budget 0.75, loopback, {C.machine()['cpu_class']}", fontsize=9)
    run.plot(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
