"""`bench` and `eval`: speed and quality of full vs uniform vs LExI; `report`: docs/results.md from the
benches' saved results."""
from __future__ import annotations

from pathlib import Path

from .. import LexiError, read_json
from ..runtime.options import PREFETCH_MODES
from .common import (add_device_opts, add_json_opt, floats, human, ints, load_options, one_prefetch_mode, outputs,
                     path, prefetch_modes, write_json)


def cmd_bench(args) -> None:
    from ..measure.bench import bench, plot, switch_bench, switch_table, table
    if args.k and (args.switch or args.mem_limit):
        raise LexiError("--k is a configuration of the plain bench: leave out --switch / --mem-limit")
    if args.mem_limit:
        if args.expert_cache:
            raise LexiError("--expert-cache bounds expert memory itself, with no cgroup: leave out --mem-limit")
        if args.switch or args.n_gpu_layers or args.rpc:
            raise LexiError("--mem-limit runs each configuration in its own memory-limited CPU process: "
                            "leave out --switch, --n-gpu-layers and --rpc")
        from ..measure import memlimit
        # each token may read hundreds of MB from disk: fewer tokens and one repetition unless asked
        res = memlimit.bench_mem_limited(args.model, args.budgets, mem_limit=args.mem_limit, n_gen=args.n_gen or 16,
                                         warmup=args.warmup, threads=args.threads, reps=args.reps or 1,
                                         prefetch=tuple(args.prefetch), repack=args.repack,
                                         replay=args.routing_replay)
        js, png = outputs(args, "memlimit")
        print(memlimit.table(res), file=human(args))
        write_json(res, js)
        memlimit.plot(res, png)
        print(f"json -> {js}\nplot -> {png}", file=human(args))
        return
    if args.n_gen is None:
        args.n_gen = 128
    if args.reps is None:
        args.reps = 3
    options = load_options(args, one_prefetch_mode(args.prefetch))
    if args.switch:
        if args.routing_replay:
            raise LexiError("--switch measures switching budgets with the model's own routing: leave out --routing-replay")
        res = switch_bench(args.model, args.budgets, n_gen=args.n_gen, options=options)
        js = args.json if args.json == "-" else Path(args.json) if args.json else Path(args.model).with_suffix(".switch.json")
        print(switch_table(res), file=human(args))
        write_json(res, js)
        print(f"json -> {js}", file=human(args))
        return
    res = bench(args.model, args.budgets, n_prompt=args.n_prompt, n_gen=args.n_gen, reps=args.reps, options=options,
                progress=args.json != "-", replay=args.routing_replay, custom=args.k)
    js, png = outputs(args, "bench")
    print(table(res), file=human(args))
    write_json(res, js)
    plot(res, png)
    print(f"json -> {js}\nplot -> {png}", file=human(args))


def cmd_eval(args) -> None:
    from ..measure.evaluate import cross_check, evaluate, pareto_plot, table
    text_path = Path(args.text)
    if not text_path.exists():
        raise LexiError(f"{text_path} does not exist; give a UTF-8 text file with --text")
    options = load_options(args)
    res = evaluate(args.model, text_path.read_text(errors="replace"), args.budgets, ctx=args.ctx, options=options,
                   max_chunks=args.chunks, progress=args.json != "-", custom=args.k, rules=token_rules(args))
    if args.cross_check:
        res["llama_perplexity"] = cross_check(args.model, text_path, args.ctx, chunks=res["chunks"], options=options)
        print(f"llama-perplexity (full model): PPL {res['llama_perplexity']['ppl']:.4f}  ours {res['rows'][0]['ppl']:.4f}",
              file=human(args))
    js, png = outputs(args, "eval")
    print(table(res), file=human(args))
    write_json(res, js)
    bench_res = read_json(args.bench) if args.bench else None
    pareto_plot(res, png, bench_res)
    print(f"json -> {js}\nplot -> {png}", file=human(args))


def token_rules(args) -> list:
    """eval's per-token rules: each --ser KMIN,T and each --top-p P (runtime.pertoken)."""
    from ..runtime.pertoken import ser, top_p
    rules = []
    for pair in args.ser or []:
        if len(pair) != 2 or pair[0] != int(pair[0]):
            raise LexiError(f"--ser {','.join(f'{x:g}' for x in pair)}: give KMIN,T, e.g. 1,0.3 (keep the top KMIN "
                            "experts and each further one with probability >= T x the top one's)")
        rules.append(ser(int(pair[0]), pair[1]))
    return rules + [top_p(p) for p in args.top_p or []]


def cmd_report(args) -> None:
    from ..measure.report import write_report
    out = write_report(args.results, args.output, check=args.check)
    if out != "-":
        print(f"{out} is current" if args.check else f"wrote {out}")


def register(sub) -> None:
    p = sub.add_parser("bench", help="prefill/decode tok/s: full vs uniform vs lexi at each budget")
    p.add_argument("model")
    p.add_argument("--budgets", type=floats, default=[0.75, 0.5], help="budgets stored in the file (default 0.75,0.5)")
    p.add_argument("--n-prompt", type=int, default=512)
    p.add_argument("--n-gen", type=int, help="decode tokens (default 128; 16 with --mem-limit)")
    p.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --mem-limit)")
    p.add_argument("--prefetch", type=prefetch_modes, default=["off"],
                   help=f"expert prefetch mode: {', '.join(PREFETCH_MODES)} (docs/memory.md); with --mem-limit a list "
                        "to compare, e.g. off,chosen,guess")
    p.add_argument("--mem-limit", metavar="SIZE",
                   help="decode each configuration in a child inside a memory cgroup of SIZE (e.g. 3G, 3.5GiB; "
                        "needs root), the model mmapped and evicted first: tok/s, major faults and bytes read per token")
    p.add_argument("--warmup", type=int, default=4, help="with --mem-limit: decode tokens before timing (default 4)")
    p.add_argument("--k", type=ints, help="also run these counts (one per MoE layer), set on the loaded model")
    p.add_argument("--routing-replay", metavar="TRACE", type=path,
                   help="run the experts a trace recorded (`trace run` or `trace import`) instead of the router's, "
                        "each layer keeping its k best; the memory traffic of recorded routing")
    p.add_argument("--threads", type=int)
    add_device_opts(p)
    p.add_argument("--switch", action="store_true",
                   help="one loaded model: decode tok/s per budget and the latency of switching budgets in place")
    add_json_opt(p, "the results", "MODEL.bench.json")
    p.add_argument("--plot", type=path, help="PNG (default beside the JSON)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="perplexity and KL divergence vs the full model")
    p.add_argument("model")
    p.add_argument("--text", type=path, required=True, help="evaluation text file")
    p.add_argument("--budgets", type=floats, default=[0.75, 0.5])
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, help="at most this many chunks")
    p.add_argument("--k", type=ints, help="also run these counts (one per MoE layer), set on the loaded model")
    p.add_argument("--ser", type=floats, action="append", metavar="KMIN,T",
                   help="also run ik_llama.cpp's SER per token at the model's own k: keep the top KMIN experts and "
                        "each further one whose probability is >= T x the top one's (repeatable; docs/pertoken.md)")
    p.add_argument("--top-p", type=floats, metavar="P,...",
                   help="also run top-p per token at the model's own k: experts best first until their routing "
                        "probability mass reaches P (docs/pertoken.md)")
    p.add_argument("--threads", type=int)
    add_device_opts(p)
    p.add_argument("--cross-check", action="store_true", help="also run llama-perplexity on the full model")
    p.add_argument("--bench", type=path, help="a bench JSON: plot KLD against measured decode speed")
    add_json_opt(p, "the results", "MODEL.eval.json")
    p.add_argument("--plot", type=path, help="PNG (default beside the JSON)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="docs/results.md from the benches' results (bench/results/*.json)",
                       description="Render every results file of the benches (one section per family, each stamped "
                       "with the machine, date, commit, patch hash and llama.cpp commit it ran on) as markdown.")
    p.add_argument("--results", type=path, metavar="DIR",
                   help="the results directory (default: the checkout's bench/results)")
    p.add_argument("-o", "--output", type=path,
                   help="where the markdown goes (default: docs/results.md beside the results' checkout; - for stdout)")
    p.add_argument("--check", action="store_true", help="write nothing; fail if the output is not what it would write")
    p.set_defaults(func=cmd_report)
