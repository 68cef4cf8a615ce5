#!/usr/bin/env python3
"""What `lexi-gguf synth` needs: time, disk and memory to write each released shape at the quant people
download (qwen3-30b-a3b, mixtral-8x7b, deepseek-v2-lite, olmoe-1b-7b at Q4_K_M; gpt-oss-20b at MXFP4),
and that the whole file decodes: the file loaded in the runtime, a prompt read and a few tokens
decoded with finite logits through every layer. Each file is written (with the writer's read-back) in a
child process (its peak RSS is the writer's memory), timed until it is renamed into place and until it
is on the disk (`sync`), checked, decoded, then deleted, except qwen3-30b-a3b Q4_K_M, which
is moved into synth's cache (the true-size benchmarks use it). Results: bench/results/synth-<machine>.json;
docs/true-size.md. Run it alone (`flock /tmp/lexi-heavy.lock`): ~70 GB written, one file at a time.
--quick: 2 layers of each.

    .venv/bin/python bench/bench_synth.py [--shapes qwen3-30b-a3b,olmoe-1b-7b]
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python bench/bench_synth.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as C  # noqa: E402

QUANT = {"qwen3-30b-a3b": "Q4_K_M", "mixtral-8x7b": "Q4_K_M", "deepseek-v2-lite": "Q4_K_M", "olmoe-1b-7b": "Q4_K_M",
         "gpt-oss-20b": "MXFP4"}
KEEP = ("qwen3-30b-a3b", "Q4_K_M")


def decode(path: Path, threads: int, n: int = 2) -> dict:
    import numpy as np

    from lexi_gguf.runtime import llama as runtime
    t0 = time.perf_counter()
    llm = runtime.load(path, n_ctx=64, n_threads=threads, logits_all=True)
    load_s = time.perf_counter() - t0
    toks = llm.tokenize(b"The")
    t0 = time.perf_counter()
    llm.eval(toks)
    finite, std = [], []
    for _ in range(n):
        lg = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        finite.append(bool(np.isfinite(lg).all()))
        std.append(float(lg.std()))
        llm.eval([int(np.argmax(lg))])
    s = time.perf_counter() - t0
    llm.close()
    return {"load_s": load_s, "decode_s": s, "tokens": len(toks) + n, "finite": all(finite), "logit_std": std}


def write_child(s, quant: str, out: Path, full_layers: int) -> tuple[float, float]:
    """synth.write in a forked child: (seconds until the file is renamed into place, the child's peak RSS
    in MiB: the writer's own memory, apart from the models this bench loads)."""
    from lexi_gguf.testbeds import synth
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            synth.write(s, quant, out, full_layers=full_layers, progress=False)
            code = 0
        finally:
            os._exit(code)
    _, status, ru = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench: writing {out.name} failed (exit {os.waitstatus_to_exitcode(status)})")
    return time.perf_counter() - t0, ru.ru_maxrss / 2**10


def main() -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--shapes", default=",".join(QUANT))
    args = ap.parse_args()
    run = C.Run(args, "synth", "quick" if args.quick else None)
    from lexi_gguf.gguf.check import check
    from lexi_gguf.testbeds import shapes, synth
    work = C.WORK / "synth"
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in args.shapes.split(","):
        full, quant = shapes.get(name), QUANT[name]
        s = shapes.reduced(full, layers=2) if args.quick else full
        out = work / f"{name}-{quant}.gguf"
        out.unlink(missing_ok=True)
        os.sync()
        free0 = shutil.disk_usage(work).free
        t0 = time.perf_counter()
        sec, rss = write_child(s, quant, out, full.layers)
        os.sync()                                      # and until it is on the disk
        synced = time.perf_counter() - t0
        size = out.stat().st_size
        check(out)
        dec = decode(out, args.threads)
        row = {"quant": quant, "layers": s.layers, "experts": s.experts, "vocab": s.vocab, "n_vocab": s.n_vocab,
               "file_gib": size / 2**30, "disk_used_gib": (free0 - shutil.disk_usage(work).free) / 2**30,
               "write_s": sec, "write_mb_s": size / sec / 1e6, "on_disk_s": synced, "writer_peak_rss_mib": rss,
               "load_s": dec["load_s"], "decode_s": dec["decode_s"],
               "tokens": dec["tokens"], "finite": dec["finite"], "logit_std": dec["logit_std"][-1],
               "expert_mib": shapes.expert_bytes(s, quant)[0] / 2**20}
        rows[name] = row
        print(f"{name} {quant}: {size / 2**30:.2f} GiB written in {sec:.0f} s ({row['write_mb_s']:.0f} MB/s, on the disk "
              f"after {synced:.0f} s, writer peak RSS {rss:.0f} MiB); "
              f"decode {dec['tokens']} tokens in {dec['decode_s']:.1f} s, finite {dec['finite']}", flush=True)
        if (name, quant) == KEEP and not args.quick:
            cached = synth.cache_dir() / synth.cache_name(s, quant)
            cached.parent.mkdir(parents=True, exist_ok=True)
            os.replace(out, cached)
        else:
            out.unlink()
    res = {"shapes": rows, "generator": synth.GENERATOR,
           "targets_met": {"every file decodes with finite logits": all(r["finite"] for r in rows.values())}}
    run.save(res)
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(6, 2.8))
    names = list(rows)
    ax.barh(names, [rows[n]["write_s"] for n in names], color="C0")
    for i, n in enumerate(names):
        ax.text(rows[n]["write_s"], i, f" {rows[n]['file_gib']:.1f} GiB", va="center", fontsize=8)
    ax.set_xlabel("seconds to write (with read-back)")
    ax.set_title(f"lexi-gguf synth ({C.machine()['cpu_class']})", fontsize=9)
    run.plot(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
