#!/usr/bin/env python3
"""What llama.cpp's RPC backend costs (issue 21): prefill and decode tok/s of the built-in default model
(Q8_0) run locally, with every layer on one ggml-rpc-server, and split over two, on loopback, at full k,
uniform k and LExI at 0.75 (`lexi-gguf bench`, each in its own process).

Loopback is not a network: it has no wire latency and no bandwidth limit beyond memory copies, so
this is the protocol's overhead (graph serialisation, one round trip per graph split, activations
copied through sockets), a floor under what two machines would see. On 2 cores the servers and the
client share the CPU (the client, one thread, waits while a server computes).
Results: bench/results/rpc-<machine id>.json and .png. --quick: 32/8 tokens, one repetition.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python bench/bench_rpc.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as C  # noqa: E402


def bench_run(gguf: Path, args, rpc: list[str], threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        js = Path(tmp) / "b.json"
        cmd = [sys.executable, "-m", "lexi_gguf.cli", "bench", str(gguf), "--budgets", "0.75", "--n-prompt",
               str(args.n_prompt), "--n-gen", str(args.n_gen), "--reps", str(args.reps), "--threads", str(threads),
               "--json", str(js), "--plot", str(Path(tmp) / "b.png"), *(["--rpc", ",".join(rpc)] if rpc else [])]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(js.read_text())


def main() -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--work", default=str(C.WORK))
    ap.add_argument("--n-prompt", type=int, default=128)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.quick:
        args.n_prompt, args.n_gen, args.reps = 32, 8, 1
    run = C.Run(args, "rpc")
    from bench.loadgen import free_port
    from bench.models import default_gguf
    from lexi_gguf.runtime import rpc

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gguf = default_gguf(work, args.threads)
    setups = {"local": 0, "1 rpc-server": 1, "2 rpc-servers": 2}
    rows = []
    for name, n in setups.items():
        # the servers' threads share the 2 cores with each other (the client mostly waits on them)
        threads = max(1, args.threads // max(n, 1))
        servers = [rpc.start_server(port=free_port(), threads=threads, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL) for _ in range(n)]
        try:
            eps = [f"127.0.0.1:{s.args[s.args.index('-p') + 1]}" for s in servers]
            # with every layer remote the client computes next to nothing: one thread, so its spinning
            # OpenMP workers do not take the servers' cores
            res = bench_run(gguf, args, eps, 1 if n else args.threads)
        finally:
            for s in servers:
                s.kill()
                s.wait()
        for r in res["rows"]:
            rows.append({"setup": name, "server_threads": threads if n else None, "config": r["config"],
                         "pp_tps": r["pp_tps"], "tg_tps": r["tg_tps"], "tg_min": r["tg_min"], "tg_max": r["tg_max"]})
        print(f"  {name}: " + ", ".join(f"{r['config']} tg {r['tg_tps']:.0f}" for r in res["rows"]), flush=True)
    local = {r["config"]: r for r in rows if r["setup"] == "local"}
    for r in rows:
        r["tg_vs_local"] = r["tg_tps"] / local[r["config"]]["tg_tps"]
        r["pp_vs_local"] = r["pp_tps"] / local[r["config"]]["pp_tps"]
    print("\n| setup | config | pp tok/s | tg tok/s | tg vs local |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setup']} | {r['config']} | {r['pp_tps']:.0f} | {r['tg_tps']:.1f} | {r['tg_vs_local']:.2f}x |")
    res = {"model": str(gguf), "n_prompt": args.n_prompt, "n_gen": args.n_gen, "reps": args.reps,
           "link": "loopback (not a network)", "rows": rows}
    run.save(res)
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    configs = list(local)
    for i, name in enumerate(setups):
        vals = [next(r["tg_tps"] for r in rows if r["setup"] == name and r["config"] == c) for c in configs]
        ax.bar([j + (i - 1) * 0.27 for j in range(len(configs))], vals, 0.27, label=name)
    ax.set_xticks(range(len(configs)), configs)
    ax.set_ylabel("decode tok/s")
    ax.set_title(f"RPC over loopback (not a network), default model Q8_0, {C.machine()['cpu_class']}", fontsize=9)
    ax.legend(fontsize=8)
    run.plot(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
