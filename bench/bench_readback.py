#!/usr/bin/env python3
"""What the read-back check costs `apply` on a file of the size users bring (gguf.verify.ReadBack).

A qwen3-30b-a3b-shaped GGUF at Q4_K_M (`lexi-gguf synth --like qwen3-30b-a3b`: 48 MoE blocks of 128
experts, the real vocabulary, random weights in valid blocks; ~17.3 GiB), from synth's cache. Then the
copy `apply --k` makes (the lexi keys written into a streamed copy) is timed with the read-back check and without it (the writer's
read_back=False, which only this bench uses), alternating, each run after the source has been read once
(`cat`) and timed until the output is on the disk (`sync`), and a plain `cp` for the disk's copy rate. Results: bench/results/readback-<machine>.json.
--quick: its first 4 blocks (~1.8 GB), one run each.

    .venv/bin/python bench/bench_readback.py [--blocks 48] [--reps 3]
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python bench/bench_readback.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as C  # noqa: E402


def synth(blocks: int) -> Path:
    """The qwen3-30b-a3b shape at Q4_K_M (its first `blocks` layers), from `lexi-gguf synth`'s cache."""
    from lexi_gguf.testbeds import shapes, synth as make
    full = shapes.get("qwen3-30b-a3b")
    return make.synth(shapes.reduced(full, layers=blocks), "Q4_K_M", full_layers=full.layers)["path"]


def main() -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--blocks", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", default=str(C.WORK / "readback"))
    args = ap.parse_args()
    if args.quick:
        args.blocks, args.reps = 4, 1
    run = C.Run(args, "readback", None if args.blocks == 48 else f"{args.blocks}blocks")
    from lexi_gguf.gguf.reader import model_info
    from lexi_gguf.gguf.writer import copy_with_metadata, lexi_metadata
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = synth(args.blocks)
    out = work / "applied.gguf"
    size = src.stat().st_size
    info = model_info(src)
    md = lexi_metadata(info, [6 if i in info.moe_layers else 0 for i in range(info.block_count)], "manual")
    times: dict[str, list[float]] = {"with read-back": [], "without": [], "cp": []}
    copy_with_metadata(src, out, md, force=True, progress=False)     # a first, untimed run (it was 2x slower)
    out.unlink()
    for rep in range(args.reps):
        for name in ("without", "with read-back", "cp"):
            os.sync()                  # no write-back of the last run left to collide with this one
            subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)   # the same start each time
            t0 = time.perf_counter()
            if name == "cp":
                subprocess.run(["cp", str(src), str(out)], check=True)
            else:
                copy_with_metadata(src, out, md, force=True, progress=False, read_back=name != "without")
            os.sync()                  # timed until the output is on the disk
            times[name].append(time.perf_counter() - t0)
            out.unlink()
            print(f"run {rep + 1}/{args.reps} {name}: {times[name][-1]:.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    cost = med["with read-back"] - med["without"]
    res = {"blocks": args.blocks, "file_bytes": size, "reps": args.reps, "seconds": times, "median_s": med,
           "read_back_s": cost, "read_back_share": cost / med["with read-back"],
           "targets_met": {"read-back a small part of apply (< 20 %)": cost / med["with read-back"] < 0.20}}
    print(f"| file | apply with read-back | without | read-back costs | share | cp |\n|---|---|---|---|---|---|\n"
          f"| {size / 2**30:.1f} GiB | {med['with read-back']:.1f} s | {med['without']:.1f} s | {cost:.1f} s | "
          f"{cost / med['with read-back']:.0%} | {med['cp']:.1f} s |  (median of {args.reps})")
    run.save(res)
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(5, 2.6))
    names = list(times)
    ax.barh(names, [med[n] for n in names], color=["C3", "C0", "C7"])
    for n in names:
        ax.plot(times[n], [n] * len(times[n]), "k|")
    ax.set_xlabel(f"seconds (median of {args.reps}, runs as ticks)")
    ax.set_title(f"apply's copy of a {size / 2**30:.1f} GiB file ({C.machine()['cpu_class']})", fontsize=9)
    run.plot(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
