#!/usr/bin/env python3
"""`lexi-gguf apply` on the quant types users download (issue 22): time, peak RSS and the allocation, per
type, on an OLMoE-shaped model of a stated layer size (default 2 MoE layers of 32 experts, hidden 1024,
expert ffn 512: 50 M expert weights a layer, 100 MB in bf16). Each type is made by the pinned
llama-quantize (IQ2/IQ3 with a llama-imatrix matrix); apply runs in its own process, which reports its
VmHWM (peak resident set, the mmapped file pages it read included). The f32 file's allocation is the reference; the table says whether each type gives the same k.

Results: bench/results/apply-quants-<machine id>.json and .png. --quick: hidden 256, expert ffn 128,
8 experts, 512 samples, types F32, Q8_0 and Q4_K_M.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python bench/bench_apply_quants.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as C  # noqa: E402

TYPES = ["F32", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "IQ4_XS", "IQ4_NL",
         "IQ3_XXS", "IQ2_XXS", "MXFP4_MOE"]
NEEDS_IMATRIX = {"IQ2_XXS", "IQ3_XXS"}


# the child reports its own VmHWM: a forked child's ru_maxrss starts at the parent's peak (Linux keeps the
# high-water mark across exec), so wait4's number would be the bench's, not apply's
_CHILD = ("import sys; from lexi_gguf import cli; rc = cli.main(sys.argv[1:]); "
          "print('PEAK_KIB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')), "
          "file=sys.stderr); sys.exit(rc)")


def run_apply(src: Path, out: Path, samples: int, threads: int) -> tuple[float, float]:
    """(seconds, peak RSS MiB, file pages it read included) of one `lexi-gguf apply --budget 0.5`."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CHILD, "apply", str(src), "-o", str(out), "--force",
                        "--budget", "0.5", "--samples", str(samples), "--threads", str(threads)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"apply failed on {src.name}: {r.stderr[-600:]}")
    peak = next(int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("PEAK_KIB"))
    return secs, peak / 1024


def main() -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--work", default=str(C.ROOT / "out" / "bench-quants"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--types", default=",".join(TYPES))
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.ffn, args.experts, args.samples, args.types = 256, 128, 8, 512, "F32,Q8_0,Q4_K_M"
    run = C.Run(args, "apply-quants")
    from lexi_gguf.export.hf_to_gguf import convert_to_gguf
    from lexi_gguf.gguf import keys
    from lexi_gguf.gguf.reader import model_info
    from lexi_gguf.runtime.llama import llama_cpp_dir, tool
    from lexi_gguf.testbeds.tinymodels import make_checkpoint

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shape = f"{args.layers}L-{args.experts}x{args.ffn}-h{args.hidden}"
    f32 = work / f"olmoe-{shape}-F32.gguf"
    if not f32.exists():
        print(f"building the {shape} OLMoE ...", flush=True)
        hf = make_checkpoint("olmoe", work / f"hf-{shape}", llama_cpp_dir(), seed=11, hidden_size=args.hidden,
                             intermediate_size=args.ffn, num_experts=args.experts, num_hidden_layers=args.layers,
                             router_scale=4.0, num_attention_heads=8, num_key_value_heads=8)
        convert_to_gguf(hf, f32, llama_cpp_dir())
    imatrix = work / f"imatrix-{shape}.gguf"
    if not imatrix.exists():
        # any English text of > 1k tokens; the results up to issue 34 used the README of that time
        subprocess.run([str(tool("llama-imatrix")), "-m", str(f32), "-f", str(C.ROOT / "docs" / "method.md"), "-c", "128",
                        "--chunks", "8", "-t", "2", "-o", str(imatrix)], check=True, capture_output=True)
    layer_weights = args.experts * 3 * args.hidden * args.ffn
    rows, ref = [], None
    for quant in args.types.split(","):
        src = f32 if quant == "F32" else work / f"olmoe-{shape}-{quant}.gguf"
        if not src.exists():
            cmd = [str(tool("llama-quantize")), *(["--imatrix", str(imatrix)] if quant in NEEDS_IMATRIX else []),
                   str(f32), str(src) + ".tmp", quant, "2"]
            subprocess.run(cmd, check=True, capture_output=True)
            Path(str(src) + ".tmp").rename(src)       # an interrupted run leaves no half-written file
        out = work / f"lexi-{quant}.gguf"
        secs, rss = run_apply(src, out, args.samples, args.threads)
        lx = model_info(out).lexi
        k = [int(x) for x in lx[keys.EXPERT_USED_COUNT]]
        ref = ref or k
        rows.append({"type": quant, "file_mib": src.stat().st_size / 2**20, "apply_s": secs, "peak_rss_mib": rss,
                     "expert_types": lx[keys.SENS_SOURCE], "k": k, "same_k_as_f32": k == ref})
        r = rows[-1]
        print(f"{quant:>10}: {r['file_mib']:7.1f} MiB  apply {secs:6.1f} s  peak RSS {rss:7.1f} MiB  k {k}", flush=True)
    print(f"\nlexi-gguf apply --budget 0.5 --samples {args.samples}, {args.layers} MoE layers of {args.experts} "
          f"experts, hidden {args.hidden}, expert ffn {args.ffn} ({layer_weights / 1e6:.0f} M expert weights a "
          f"layer = {layer_weights * 2 / 2**20:.0f} MiB bf16)\n")
    print("| type | experts read as | file MiB | apply s | peak RSS MiB | k per MoE layer | same k as F32 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['expert_types']} | {r['file_mib']:.0f} | {r['apply_s']:.1f} | {r['peak_rss_mib']:.0f} | "
              f"{r['k']} | {'yes' if r['same_k_as_f32'] else 'no'} |")
    res = {"shape": shape, "samples": args.samples, "layer_expert_weights": layer_weights, "threads": args.threads,
           "imatrix_text": "docs/method.md", "rows": rows}
    run.save(res)
    plt = C.pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    names = [r["type"] for r in rows]
    ax[0].bar(names, [r["apply_s"] for r in rows])
    ax[0].set_ylabel("apply time (s)")
    ax[1].bar(names, [r["peak_rss_mib"] for r in rows], color="tab:orange")
    ax[1].axhline(layer_weights * 2 / 2**20, color="k", ls="--", lw=1, label="one layer's experts in bf16")
    ax[1].set_ylabel("peak RSS (MiB)")
    ax[1].legend(fontsize=7)
    for a in ax:
        a.tick_params(axis="x", rotation=60, labelsize=7)
    fig.suptitle(f"lexi-gguf apply per input type ({shape}, {C.machine()['cpu_class']})", fontsize=9)
    run.plot(fig)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
