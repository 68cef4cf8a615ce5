#!/usr/bin/env python3
"""The mutation campaign at full size (bench/mutations.py; the suite runs a smaller one): damaged
copies of a converted model through inspect, apply, relayout, chat, serve's load, bench and trace, every
command on every case. Prints the outcomes by command and by kind of damage, and every failure (a
traceback, a signal or C++ abort, a hang, a refusal that left a file, exit 0 with a bad file, a damaged
lexi key accepted). Results: bench/results/mutation-<machine id>.json (rendered into docs/results.md).

The source is the built-in default model converted as `make demo` converts it (Q8_0, budget 0.75, a
ladder), or any GGUF with lexi keys (--source). --quick: 20 byte flips, heavy commands on every 4th
header case.

    .venv/bin/python bench/bench_mutations.py [--flips 400] [--seed 0] [--source model.gguf]
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python bench/bench_mutations.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as C  # noqa: E402


def main() -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--flips", type=int, default=400, help="random header byte flips (the other cases are fixed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source", help="a GGUF with lexi keys (default: the built-in model, converted)")
    ap.add_argument("--work", default=str(C.WORK / "mutations"))
    args = ap.parse_args()
    if args.quick:
        args.flips = 20
    run = C.Run(args, "mutation")
    from bench.mutations import campaign
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.source:
        src = Path(args.source)
    else:
        from lexi_gguf.export.convert import convert
        from lexi_gguf.testbeds.builtin import ensure_default_model, recipe_hash
        src = work / f"default-{recipe_hash('default')}-Q8_0.gguf"
        if not src.exists():
            convert(ensure_default_model(), src, budget=0.75, budgets=[1.0, 0.75, 0.5], quant="Q8_0", threads=args.threads)
    res = campaign(src, work / "cases", seed=args.seed, flips=args.flips, heavy_every=4 if args.quick else 1,
                   timeout=120)
    outcomes = sorted({o for v in res["by_command"].values() for o in v})
    print(f"{res['cases']} cases, {res['runs']} runs in {res['seconds']:.0f} s ({src.name})")
    print("| command | " + " | ".join(outcomes) + " |")
    print("|---|" + "---|" * len(outcomes))
    for cmd, v in res["by_command"].items():
        print(f"| {cmd} | " + " | ".join(str(v.get(o, 0)) for o in outcomes) + " |")
    for f in res["failures"][:20]:
        print(f"FAILURE {f['case']} ({f['detail']}) {f['command']}: {f['outcome']}: {f.get('detail', '')[:200]}")
    res.update(source=src.name, seed=args.seed, flips=args.flips,
               targets_met={"no failure": not res["failures"], ">= 200 cases": res["cases"] >= 200})
    run.save(res)
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    cmds = list(res["by_command"])
    bottom = [0] * len(cmds)
    for i, o in enumerate(outcomes):
        ys = [res["by_command"][c].get(o, 0) for c in cmds]
        ax.bar(cmds, ys, bottom=bottom, label=o, color="C2" if o == "ok" else "C0" if o == "refused" else "C3")
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.set_ylabel("runs")
    ax.set_title(f"mutation campaign: {res['cases']} damaged files ({C.machine()['cpu_class']})", fontsize=9)
    ax.legend(fontsize=8)
    run.plot(fig)
    return 0 if not res["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
