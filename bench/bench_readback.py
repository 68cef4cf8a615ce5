#!/usr/bin/env python3
"""What the read-back check costs `apply` on a file of the size users bring (gguf.verify.ReadBack).

A qwen3-30b-a3b-shaped GGUF (48 MoE blocks, 128 experts of 2048 x 768, router, attention and norms) is
written with gguf-py: experts as Q4_K bytes (the right size for Q4_K_M's expert tensors, not valid
weights: apply copies them, it never computes with them), ~17 GB. Then the copy `apply --k` makes (the
lexi keys written into a streamed copy) is timed with the read-back check and without it (the writer's
read_back=False, which only this bench uses), alternating, each run after the source has been read once
(`cat`) and timed until the output is on the disk (`sync`), and a plain `cp` for the disk's copy rate. Results: bench/results/readback-<machine>.json.
--quick: 4 blocks (~1.4 GB), one run each.

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

HIDDEN, EXPERTS, FF, K = 2048, 128, 768, 8


def synth(path: Path, blocks: int) -> Path:
    """A qwen3moe-shaped file: the tensors that make its size, filled with repeated random bytes."""
    import numpy as np

    from lexi_gguf.gguf.reader import gguf_py
    gguf = gguf_py()
    Q = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(path, arch="qwen3moe")
    for key, v in (("block_count", blocks), ("expert_count", EXPERTS), ("expert_used_count", K),
                   ("embedding_length", HIDDEN), ("expert_feed_forward_length", FF), ("context_length", 4096)):
        w.add_uint32(f"qwen3moe.{key}", v)
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, size=64 << 20, dtype=np.uint8)

    def q(shape_el, qt):         # bytes of a quantized tensor of this element shape (numpy order)
        blk, size = gguf.GGML_QUANT_SIZES[qt]
        return shape_el[:-1] + (shape_el[-1] // blk * size,)
    tensors = []
    for i in range(blocks):
        tensors.append((f"blk.{i}.ffn_gate_inp.weight", (EXPERTS, HIDDEN), Q.F32))
        tensors.append((f"blk.{i}.attn_q.weight", (4096, HIDDEN), Q.Q8_0))
        for n in ("gate", "up"):
            tensors.append((f"blk.{i}.ffn_{n}_exps.weight", (EXPERTS, FF, HIDDEN), Q.Q4_K))
        tensors.append((f"blk.{i}.ffn_down_exps.weight", (EXPERTS, HIDDEN, FF), Q.Q4_K))
    shapes = []
    for name, shape, qt in tensors:
        b = q(shape, qt) if qt != Q.F32 else shape
        nbytes = int(np.prod(b)) * (4 if qt == Q.F32 else 1)
        shapes.append((name, b, qt, nbytes))
        w.add_tensor_info(name, b, np.float32 if qt == Q.F32 else np.uint8, nbytes, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t0 = time.perf_counter()
    total = sum(s[3] for s in shapes)
    done = 0
    for name, b, qt, nbytes in shapes:
        raw = np.resize(pool, nbytes)
        data = raw.view(np.float32).reshape(b) if qt == Q.F32 else raw.reshape(b)
        if qt == Q.F32:
            data = np.ascontiguousarray(np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0))
        w.write_tensor_data(data)
        done += nbytes
        el = time.perf_counter() - t0
        print(f"\rsynth: {done / 2**30:.1f} / {total / 2**30:.1f} GiB, ETA {el / done * (total - done):.0f} s",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    w.close()
    return path


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
    src = work / f"qwen3moe-shaped-{args.blocks}L-q4k.gguf"
    if not src.exists():
        synth(src.with_suffix(".tmp"), args.blocks).rename(src)
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
