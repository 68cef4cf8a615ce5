#!/usr/bin/env python3
"""`apply` at the size users run (issue 32, item 1): time and peak memory of `lexi-gguf apply` on a
qwen3-30b-a3b-shaped Q4_K_M (48 MoE blocks x 128 experts of 768 x 2048, k 8, ~17.3 GiB) and a
gpt-oss-20b-shaped MXFP4 (24 blocks x 32 experts of 2880 x 2880, k 4, ~11.3 GiB): the whole command,
profile + allocation + the streamed, read-back copy with the ladder 1 / 0.875 / 0.75 / 0.625 / 0.5.

Files: `lexi-gguf synth` (random weights in valid blocks at the released shape; synth's cache). On random
weights every block is alike, so the layers' deviations differ only by their weights' draw: a hard case
for a stable allocation. Stability against samples: `lexi-gguf profile FILE --samples S` at 1/4 and 4x the
default, each ladder budget allocated from each table and compared with the default's: blocks whose k
changed, and the regret, the default allocation's summed deviation measured on the 4x table over the
4x table's own optimum (0 = as good as the best allocation the better estimate knows).

Memory: peak RSS of the command (wait4's ru_maxrss, file pages it maps included) and the peak of its
anonymous memory (RssAnon, sampled every 0.5 s). CPU: the command's user + system seconds, beside the
wall time and the load average while it ran (other work on the machine shows there; the wall time of a
quiet machine is about the CPU seconds / threads when the threads are busy). Targets (issue 32):
qwen3 apply <= 10 min on 2 cores, peak RSS <= 3 GB, the allocation unchanged at 4x the samples.

    .venv/bin/python bench/bench_apply_true_size.py [--shapes qwen3-30b-a3b,gpt-oss-20b] [--stability SHAPES]
--quick: the shapes' first 2 blocks, 1024 samples.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python bench/bench_apply_true_size.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as C  # noqa: E402

QUANT = {"qwen3-30b-a3b": "Q4_K_M", "gpt-oss-20b": "MXFP4"}
LADDER = (1.0, 0.875, 0.75, 0.625, 0.5)
LEXI = Path(sys.executable).with_name("lexi-gguf")


def measured(cmd: list[str]) -> dict:
    """Run cmd; wall and CPU seconds, peak RSS (ru_maxrss) and the sampled peak of RssAnon, load average."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    anon, loads, out = 0, [], []
    import threading
    reader = threading.Thread(target=lambda: out.extend(p.stdout), daemon=True)
    reader.start()
    while p.poll() is None:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    anon = max(anon, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            pass
        loads.append(os.getloadavg()[0])
        time.sleep(0.5)
    reader.join()
    wall = time.perf_counter() - t0
    text = "".join(out)
    if p.returncode:
        sys.exit(f"bench: {' '.join(cmd)} failed:\n{text[-2000:]}")
    # the command is this process's only child (one() runs measured() in a fresh interpreter)
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": wall, "peak_rss_gb": r.ru_maxrss * 1024 / 1e9, "peak_anon_gb": anon / 1e9,
            "load_avg": sum(loads) / max(len(loads), 1),
            "output_tail": "\n".join(x for x in text.replace("\r", "\n").splitlines() if "%|" not in x)[-1500:]}


def child_cpu() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def one(cmd: list[str]) -> dict:
    """measured() in a fresh child of a fresh child, so RUSAGE_CHILDREN is that one command's."""
    code = ("import json,sys; sys.path.insert(0, %r); from bench.bench_apply_true_size import measured, child_cpu; "
            "r = measured(%r); r['cpu_s'] = child_cpu(); print(json.dumps(r))") % (str(C.ROOT), cmd)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stdout[-2000:] + p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def profiled(output: str) -> float:
    """The profile's seconds from apply's `profiled N MoE layers in X s` line."""
    m = re.search(r"profiled \d+ MoE layers in ([0-9.]+) s", output)
    if not m:
        sys.exit(f"bench: apply printed no `profiled ...` line:\n{output}")
    return float(m.group(1))


def allocations(sens: dict) -> dict[float, list[int]]:
    from lexi_gguf.method.allocate import allocate
    return {b: allocate(sens, budget=b)["expert_used_count"] for b in LADDER}


def objective(sens: dict, counts: list[int]) -> float:
    return sum(L["deviation"][k - 1] for L, k in zip(sens["layers"], counts) if L["moe"])


def stability(default: dict, others: dict[int, dict], best: dict) -> dict:
    """Per sample count and budget: blocks whose k differs from the default's, and the regret on `best`."""
    base, opt = allocations(default), allocations(best)
    rows = {}
    for s, sens in others.items():
        alloc = allocations(sens)
        rows[s] = {str(b): {"changed_blocks": sum(x != y for x, y in zip(alloc[b], base[b])),
                            "regret": regret(best, alloc[b], opt[b])} for b in LADDER}
    rows["default"] = {str(b): {"changed_blocks": 0, "regret": regret(best, base[b], opt[b])} for b in LADDER}
    return rows


def regret(table: dict, counts: list[int], best: list[int]) -> float:
    """How much more summed deviation `counts` has than `best` on `table` (0 when equal, budget 1 too)."""
    a, o = objective(table, counts), objective(table, best)
    return 0.0 if a - o <= 1e-12 * max(1.0, abs(o)) else (a - o) / o


def main() -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--shapes", default=",".join(QUANT))
    ap.add_argument("--samples", type=int, help="the default sample count (default: the profiler's)")
    ap.add_argument("--stability", default="qwen3-30b-a3b", metavar="SHAPES",
                    help="shapes whose allocation is also profiled at 1/4x and 4x the samples ('' for none)")
    ap.add_argument("--merge", action="store_true", help="keep the other shapes of this machine's last results file, "
                    "and a re-run shape's stability where it is not profiled again (each row says when it ran)")
    args = ap.parse_args()
    run = C.Run(args, "apply-true-size", "quick" if args.quick else None)
    from lexi_gguf.gguf.reader import model_info, sensitivity_from_gguf
    from lexi_gguf.method.profile import DEFAULT_SAMPLES
    from lexi_gguf.testbeds import shapes, synth
    samples = args.samples or (1024 if args.quick else DEFAULT_SAMPLES)
    work = C.WORK / "apply-true-size"
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name in args.shapes.split(","):
        full, quant = shapes.get(name), QUANT[name]
        s = shapes.reduced(full, layers=2) if args.quick else full
        src = Path(synth.synth(s, quant, full_layers=full.layers)["path"])
        out = work / f"{name}-lexi.gguf"
        cmd = [str(LEXI), "apply", str(src), "-o", str(out), "--budget", "0.75", "--budgets",
               ",".join(map(str, LADDER)), "--samples", str(samples), "--threads", str(args.threads), "--force"]
        print(f"== {name} {quant}: {src.stat().st_size / 2**30:.1f} GiB, apply ...", flush=True)
        r = one(cmd)
        sens = sensitivity_from_gguf(model_info(out))
        out.unlink()
        row = {"quant": quant, "layers": s.layers, "moe_layers": len(s.moe_layers), "experts": s.experts, "k": s.k,
               "file_gib": src.stat().st_size / 2**30, "samples": samples, "threads": args.threads,
               "apply": {k: v for k, v in r.items() if k != "output_tail"},
               "profile_s": profiled(r["output_tail"]), "ran": {k: v for k, v in C.provenance().items() if k in ("date", "commit", "dirty")}}
        row["per_layer_s"] = row["profile_s"] / len(s.moe_layers)
        print(f"   apply {r['wall_s']:.0f} s wall ({r['cpu_s']:.0f} CPU s, load {r['load_avg']:.1f}), profile "
              f"{row['profile_s']:.0f} s ({row['per_layer_s']:.1f} s a block), peak RSS {r['peak_rss_gb']:.2f} GB "
              f"(anonymous {r['peak_anon_gb']:.2f} GB)", flush=True)
        if name in args.stability.split(","):
            tables = {}
            for mult in (0.25, 4):
                n = int(samples * mult)
                js = work / f"{name}-{n}.json"
                p = one([str(LEXI), "profile", str(src), "-o", str(js), "--samples", str(n), "--threads",
                         str(args.threads)])
                tables[n] = json.loads(js.read_text())
                print(f"   profile at {n} samples: {p['wall_s']:.0f} s", flush=True)
            row["stability"] = stability(sens, {n: t for n, t in tables.items() if n != samples * 4},
                                         tables[samples * 4])
            row["stability_at_4x"] = stability(sens, {samples * 4: tables[samples * 4]}, tables[samples * 4])
            for n, by_b in row["stability_at_4x"].items():
                if n != "default":
                    print("   4x samples vs default: " + ", ".join(
                        f"{b}: {v['changed_blocks']} blocks changed, regret {v['regret']:.2%}" for b, v in by_b.items()))
        rows[name] = row
    if args.merge and run.json.exists():
        prev = json.loads(run.json.read_text())
        for name, old in prev["shapes"].items():
            if name not in rows:
                rows[name] = old
            elif "stability" not in rows[name] and "stability" in old:
                rows[name].update({k: old[k] for k in ("stability", "stability_at_4x") if k in old},
                                  stability_ran=old.get("ran") or {"date": prev.get("date")})
    q = rows.get("qwen3-30b-a3b")
    targets = {}
    if q and not args.quick:
        targets["qwen3 apply <= 10 min (wall)"] = q["apply"]["wall_s"] <= 600
        targets["qwen3 peak RSS <= 3 GB"] = q["apply"]["peak_rss_gb"] <= 3
        if "stability_at_4x" in q:
            targets["qwen3 allocation unchanged at 4x samples"] = all(
                v["changed_blocks"] == 0 for n, by_b in q["stability_at_4x"].items() if n != "default"
                for v in by_b.values())
    res = {"machine": C.machine(), "shapes": rows, "ladder": list(LADDER), "targets_met": targets,
           "note": "synthetic files (random weights at the released shapes); wall times include whatever else "
                   "ran on the machine (load_avg), cpu_s does not"}
    run.save(res)
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(rows)
    ax.bar([f"{n}\nwall" for n in names], [rows[n]["apply"]["wall_s"] / 60 for n in names], color="C0")
    ax.bar([f"{n}\nCPU/threads" for n in names], [rows[n]["apply"]["cpu_s"] / rows[n]["threads"] / 60 for n in names],
           color="C1")
    ax.axhline(10, color="k", ls=":", lw=1)
    ax.set_ylabel("minutes")
    ax.set_title(f"apply at true size ({samples} samples, {args.threads} threads; dotted: 10 min)")
    run.plot(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
