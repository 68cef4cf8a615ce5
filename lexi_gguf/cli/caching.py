"""`trace` (`trace run`, `trace import`), `predictor` and `cache-sim`: which experts run, predicting them,
caching them."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import LexiError
from .common import (add_device_opts, add_json_opt, budget, budget_name, floats, human, ints, lines, load_options,
                     names, path, with_counts, write_json)


def cmd_trace(args) -> None:
    from ..runtime.trace import record
    if bool(args.text) == bool(args.prompts):
        raise LexiError("give exactly one of --text FILE (read, no generation) or --prompts FILE (one prompt a line)")
    kw = {"texts": ["\n".join(lines(args.text, "--text"))]} if args.text else \
         {"prompts": [x for x in lines(args.prompts, "--prompts") if x.strip()]}
    tr = record(args.model, **kw, budget=budget_name(with_counts(args)), no_lexi=args.no_lexi, uniform_k=args.uniform_k,
                max_new_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                hidden=args.hidden, n_ctx=args.ctx, options=load_options(args), replay=args.routing_replay)
    out = tr.save(args.output)
    m = tr.meta
    print(f"traced {len(tr.tokens)} tokens ({int(tr.generated.sum())} generated) x {len(tr.moe_layers)} MoE layers "
          f"at budget {m['budget']} (k per MoE layer {tr.counts.tolist()}) in {m['seconds']:.1f} s "
          f"(callback {m['callback_seconds']:.2f} s) -> {out}")


def cmd_trace_import(args) -> None:
    from ..caching.trace_import import SIZES_FIX, expert_sizes, import_csv
    if args.quant is not None and args.like is None:
        raise LexiError("--quant goes with --like NAME (the released shape's experts at that quant mix)")
    tr = import_csv(args.csv, n_expert=args.n_expert, token_col=args.token_col, layer_col=args.layer_col,
                    experts_col=args.experts_col, weights_col=args.weights_col, token_id_col=args.token_id_col,
                    seq_col=args.seq_col)
    sizes, where = expert_sizes(len(tr.moe_layers), args.n_expert, model=args.model, like=args.like,
                                quant=args.quant, expert_bytes=args.expert_bytes)
    tr.meta["expert_bytes"], tr.meta["expert_bytes_from"] = sizes, where
    out = tr.save(args.output)
    said = (f"experts {sizes[0] / 2**20:.2f} MiB ({where})" if sizes else
            f"no expert sizes: cache-sim --clock will refuse it ({SIZES_FIX.split(': ', 1)[1]})")
    print(f"imported {len(tr.tokens)} tokens x {len(tr.moe_layers)} MoE layers (k per layer {tr.counts.tolist()}, "
          f"{tr.n_expert} experts), {said} -> {out}")


def cmd_predictor(args) -> None:
    from ..caching import predict
    from ..runtime.trace import Trace
    tr = Trace.load(args.trace)
    if args.action == "train":
        if not args.output:
            raise LexiError("predictor train needs -o PREDICTOR.pt")
        if args.kind == "sequence":        # expert ids only: any trace
            from ..caching.idpredict import SequencePredictor
            learner = SequencePredictor(tr.n_expert, len(tr.moe_layers), args.depth)
            fit = learner.fit(tr, steps=args.steps, log=print)
        else:
            learner = predict.LearnedPredictor(tr.hidden.shape[-1] if tr.hidden is not None else 0, tr.n_expert,
                                               len(tr.moe_layers), args.depth)
            fit = learner.fit(tr, epochs=args.epochs, log=print)
        learner.save(args.output)
        print(f"trained on {fit['examples']} (layer, look-ahead) examples of {len(tr.tokens)} tokens -> {args.output}")
        return
    rows = []
    if args.model:
        for d, p in predict.router_predictions(tr, args.model, depth=args.depth).items():
            rows.append({"predictor": f"router d={d}", **predict.score(tr, p)})
    if args.predictor:
        from ..caching.idpredict import SequencePredictor, load_predictor
        learner = load_predictor(args.predictor)
        name = "sequence" if isinstance(learner, SequencePredictor) else "learned"
        for d, p in learner.predictions(tr).items():
            rows.append({"predictor": f"{name} d={d}", **predict.score(tr, p)})
    from ..caching import idpredict
    id_only = {"previous": idpredict.previous_predictions(tr, args.depth),
               "online": idpredict.online_predictions(tr, args.depth)}
    if args.train_trace:
        id_only["coactivation"] = idpredict.coactivation_predictions(Trace.load(args.train_trace), tr, args.depth)
    for name, preds in id_only.items():
        for d, p in preds.items():
            rows.append({"predictor": f"{name} d={d}", **predict.score(tr, p)})
    rows.append({"predictor": "random", **predict.score(tr, predict.random_predictions(tr)[1])})
    out = human(args)
    print("| predictor | recall@k | precision | F1 | accuracy | all-zeros accuracy |\n|---|---|---|---|---|---|", file=out)
    for r in rows:
        print(f"| {r['predictor']} | {r['recall']:.3f} | {r['precision']:.3f} | {r['f1']:.3f} | {r['accuracy']:.3f} | "
              f"{r['all_zeros_accuracy']:.3f} |", file=out)
    if args.json:
        write_json({"trace": tr.meta, "rows": rows}, args.json)
        print(f"json -> {args.json}", file=out)


def _at_counts(tr, args):
    """The trace at per-layer k (--k, or --budget's counts from --model's LExI ladder), else as recorded."""
    from ..caching.simulate import with_counts
    if args.k and args.budget is not None:
        raise LexiError("give --k or --budget, not both")
    if args.k:
        return with_counts(tr, args.k)
    if args.budget is None:
        return tr
    if not args.model:
        raise LexiError("--budget reads each layer's k from a LExI ladder: give --model MODEL.gguf, or --k per layer")
    from ..gguf.reader import model_info
    from ..runtime.budgets import resolve
    b = resolve(model_info(args.model), budget_name(args.budget), str(args.model))
    return with_counts(tr, b.counts, label=f"{b.name} (counts from {Path(args.model).name}, on the recorded routing)")


def cmd_cache_sim(args) -> None:
    from ..caching import predict, simulate
    from ..runtime.trace import Trace
    from ..caching.trace_import import SIZES_FIX, has_sizes
    tr = Trace.load(args.trace)
    sized = has_sizes(tr.meta)
    if args.clock and not sized:
        raise LexiError(f"{args.trace} has no expert sizes, so --clock cannot time its transfers; {SIZES_FIX}")
    tr = _at_counts(tr, args)
    wanted = {p.split(":")[0] for p in args.policy}
    gated = [p for p in args.policy if ":" in p]
    if gated and not args.clock:
        raise LexiError(f"{gated[0]} decides what to prefetch by the time it saves: give --clock LINK")
    predictors = {"oracle": simulate.oracle_predictions(tr, args.depth), "random": predict.random_predictions(tr, args.depth)}
    if "router" in wanted:
        if not args.model:
            raise LexiError("--policy router needs --model MODEL.gguf (the routers it applies)")
        predictors["router"] = predict.router_predictions(tr, args.model, depth=args.depth)
    for pol in ("learned", "sequence"):
        if pol in wanted:
            if not args.predictor:
                raise LexiError(f"--policy {pol} needs --predictor PREDICTOR.pt (lexi-gguf predictor train)")
            from ..caching.idpredict import load_predictor
            predictors[pol] = load_predictor(args.predictor).predictions(tr)
    from ..caching import idpredict
    if "previous" in wanted:
        predictors["previous"] = idpredict.previous_predictions(tr, args.depth)
    if "online" in wanted:           # the runtime's `--cache-policy learned` predictor, as it runs
        predictors["online"] = idpredict.online_predictions(tr, args.depth, Trace.load(args.train_trace)
                                                            if args.train_trace else None)
    if "coactivation" in wanted:
        if not args.train_trace:
            raise LexiError("--policy coactivation needs --train-trace TRACE.npz (counted on other prompts)")
        predictors["coactivation"] = idpredict.coactivation_predictions(Trace.load(args.train_trace), tr, args.depth)
    if args.prefetch_top is not None:
        predictors = {n: predict.sure_guesses(p, args.prefetch_top) for n, p in predictors.items()}
    res = simulate.run(tr, args.capacity, args.policy, predictors=predictors, depth=args.depth, phase=args.phase,
                       slot_mode=args.slots)
    out = human(args)
    print("Free-transfer model (an upper bound: a prefetch is resident the moment it is issued; only demand\n"
          "misses stall):\n", file=out)
    print(simulate.table(res, args.link), file=out)
    if not sized:
        print("(this trace has no expert sizes: its MB and stall columns count 1 byte per expert; "
              f"{SIZES_FIX})", file=out)
    if args.clock:
        from ..caching import clock
        comp = args.compute_ms
        compute_s = [x / 1e3 for x in comp] if comp else clock.compute_from_trace(tr)
        if comp and len(comp) not in (1, len(tr.moe_layers)):
            raise LexiError(f"--compute-ms has {len(comp)} values; give 1 or one per MoE layer ({len(tr.moe_layers)})")
        rows = []
        for link in args.clock:
            for cap in args.capacity:
                for pol in args.policy:
                    name = pol if pol in simulate.DEMAND_POLICIES else f"prefetch:{pol}"
                    rows.append(clock.simulate_clocked(tr, cap, name, link=link, compute_s=compute_s,
                                                       predictions=predictors.get(pol.split(":")[0]), depth=args.depth,
                                                       phase=args.phase, slot_mode=args.slots,
                                                       queue_depth=args.queue_depth,
                                                       demand_first=args.demand_first).row())
        res["clock"] = {"compute_s_per_layer": compute_s, "rows": rows}
        order = "demand misses first" if args.demand_first else "FIFO"
        print(f"\nOn a clock (caching/clock.py: {args.queue_depth} request(s) in flight, {order}; a layer computes "
              "once its experts are there):\n", file=out)
        print(clock.table(rows), file=out)
    default = Path(args.trace).with_suffix(".cache.json")
    js = args.json if args.json == "-" else Path(args.json) if args.json else default
    write_json(res, js)
    png = simulate.plot(res, args.plot or (default if js == "-" else js).with_suffix(".png"))
    print(f"json -> {js}\nplot -> {png}", file=out)


class _RunByDefault(argparse._SubParsersAction):
    """`trace`'s sub-commands, `run` and `import`; once `default` is set, a first word that is none of them
    is the first argument of that sub-command, so `lexi-gguf trace MODEL ...` (the spelling before
    `trace run`) is `trace run MODEL ...`."""

    class _Choices(dict):
        default: str | None = None

        def __contains__(self, key) -> bool:   # argparse checks the first word against the choices
            return self.default is not None or dict.__contains__(self, key)

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.choices = self._name_parser_map = self._Choices()

    def __call__(self, parser, namespace, values, option_string=None):
        default = self._name_parser_map.default
        if default and values and not dict.__contains__(self._name_parser_map, values[0]):
            values = [default, *values]
        super().__call__(parser, namespace, values, option_string)


def _import_opts(p) -> None:
    p.add_argument("csv")
    p.add_argument("--n-expert", type=int, required=True, help="experts per MoE layer (ids must be below it)")
    p.add_argument("--token-col", default="token", help="token position column (default token)")
    p.add_argument("--layer-col", default="layer", help="MoE layer column (default layer)")
    p.add_argument("--experts-col", default="experts",
                   help="expert ids: one column of space/;/,/| separated ids, or a glob of one-id columns ('expert_*')")
    p.add_argument("--weights-col", help="routing weights, shaped as the experts (optional)")
    p.add_argument("--token-id-col", help="vocabulary id of the token (optional)")
    p.add_argument("--seq-col", help="prompt / sequence index (optional)")
    p.add_argument("--model", type=path, help="the GGUF the routing is from: its expert sizes go into the trace")
    p.add_argument("--like", help="or a released shape (lexi-gguf synth --like): its experts' sizes at --quant")
    p.add_argument("--quant", help="with --like: the quant mix (default Q4_K_M)")
    p.add_argument("--expert-bytes", type=int, help="or the bytes of one expert (gate + up + down), every layer")
    p.add_argument("-o", "--output", type=path, required=True)
    p.set_defaults(func=cmd_trace_import)


def register(sub) -> None:
    t = sub.add_parser("trace", help="record the experts every token selects (`trace run MODEL`, or `trace MODEL`), "
                       "or import another tool's routing (`trace import CSV`)",
                       description="Routing traces (npz; docs/caching.md): `trace run MODEL ...` records one from the "
                       "runtime (`trace MODEL ...` is the same), `trace import CSV ...` converts another tool's.")
    tsub = t.add_subparsers(dest="trace_cmd", required=True, metavar="{run,import}", action=_RunByDefault)
    p = tsub.add_parser("run", help="record the experts every token selects in every MoE layer (npz)")
    p.add_argument("model")
    p.add_argument("--text", type=path, help="text file read in ctx-sized chunks, no generation")
    p.add_argument("--prompts", type=path, help="one prompt a line; each is followed by greedy generation")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget", type=budget, help="a stored budget, 'full' or 'default'")
    g.add_argument("--no-lexi", action="store_true", help="the model's own k in every layer")
    g.add_argument("--uniform-k", type=int, help="this k in every MoE layer (what --override-kv does)")
    g.add_argument("--k", type=ints, help="run these counts, one per MoE layer (none stored in the file needed)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated after each prompt (default 32)")
    p.add_argument("--max-new-tokens", dest="max_tokens", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)     # the spelling before issue 34
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled with --seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", action="store_true", help="also record each MoE layer's router input (large)")
    p.add_argument("--routing-replay", metavar="TRACE", type=path,
                   help="run (and record) the experts another trace names instead of the router's choice")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--threads", type=int)
    add_device_opts(p)
    p.add_argument("-o", "--output", type=path, required=True)
    p.set_defaults(func=cmd_trace)

    _import_opts(tsub.add_parser("import", help="a routing trace from another tool (CSV) as a lexi-gguf trace"))
    tsub.choices.default = "run"
    _import_opts(sub.add_parser("trace-import"))     # the spelling before `trace import`: hidden, no help line

    p = sub.add_parser("predictor", help="train a learned look-ahead predictor on a trace, or score predictors")
    p.add_argument("action", choices=["train", "eval"])
    p.add_argument("trace", help="a trace recorded with --hidden (train on one prompt set, eval on another)")
    p.add_argument("--model", type=path, help="eval: the GGUF the trace was recorded from (router look-ahead baseline)")
    p.add_argument("--predictor", type=path, help="eval: a learned predictor (.pt) from `predictor train`")
    p.add_argument("--depth", type=int, default=2, help="predict layer l+d from layer l, d = 1..depth")
    p.add_argument("--epochs", type=int, default=30, help="train --kind mlp: epochs")
    p.add_argument("--kind", default="mlp", choices=["mlp", "sequence"],
                   help="train: mlp (router inputs, needs --hidden) or sequence (MoE-Beyond-style transformer "
                        "over the tokens' expert sets; ids only)")
    p.add_argument("--steps", type=int, default=400, help="train --kind sequence: optimizer steps")
    p.add_argument("--train-trace", type=path, help="eval: a trace of other prompts to count co-activations on")
    p.add_argument("-o", "--output", type=path, help="train: where to write the predictor (.pt)")
    add_json_opt(p, "eval: the scores")
    p.set_defaults(func=cmd_predictor)

    p = sub.add_parser("cache-sim", help="replay a trace through expert caches: hit rate, bytes, stalls")
    p.add_argument("trace")
    p.add_argument("--capacity", type=floats, default=[0.05, 0.1, 0.25, 0.5], help="fractions of all routed experts")
    p.add_argument("--policy", type=names,
                   default=["lru", "lfu", "eamc", "belady", "router", "oracle"],
                   help="lru, lfu, eamc (MoE-Infinity-style), nextuse (learned next-use eviction), belady (offline "
                        "optimum); router / learned / sequence / coactivation / previous / online (the runtime's "
                        "--cache-policy learned predictor) / oracle / random (prefetch "
                        "every guess, LRU eviction); PRED:gated (--clock: prefetch only guesses that pay, nextuse "
                        "eviction; the recommended prefetcher) or PRED:gated-lru")
    p.add_argument("--k", type=ints, help="replay at per-layer k: k per MoE layer (or per block, 0 on dense "
                   "blocks); each layer keeps its k recorded experts of highest routing weight")
    p.add_argument("--budget", type=budget, help="replay at a stored budget's per-layer k, read from --model's "
                   "LExI ladder (as --k)")
    p.add_argument("--model", type=path, help="the GGUF the trace was recorded from (for --policy router)")
    p.add_argument("--predictor", type=path,
                   help="a predictor .pt from `predictor train` (for --policy learned or sequence)")
    p.add_argument("--train-trace", type=path, help="a trace of other prompts (for --policy coactivation)")
    p.add_argument("--depth", type=int, default=1, help="prefetch layers l+1..l+depth")
    p.add_argument("--prefetch-top", type=int, help="prefetch only each layer's N most confident guesses (fewer "
                   "bytes, fewer hits; default: as many as the layer runs)")
    p.add_argument("--slots", default="global", choices=["global", "equal", "k"],
                   help="one shared cache, or per-layer quotas (equal, or following each layer's k)")
    p.add_argument("--phase", default="auto", choices=["auto", "decode", "all"])
    p.add_argument("--link", default="nvme", choices=["pcie4x16", "nvme", "emmc"], help="link for the stall column")
    p.add_argument("--clock", nargs="+", metavar="LINK",
                   help="also simulate on a clock over these links: pcie4x16, nvme, emmc or GBps,latency_us "
                        "(a measured disk); transfers take time, prefetches must arrive (docs/caching.md)")
    p.add_argument("--compute-ms", type=floats, help="compute per MoE layer for --clock: one value or one per "
                   "layer (default: measured while tracing)")
    p.add_argument("--queue-depth", type=int, default=1, help="--clock: requests in flight on the link (latency "
                   "overlaps, bandwidth does not; an NVMe queue is deep); default 1")
    p.add_argument("--demand-first", action="store_true",
                   help="--clock: demand misses start before queued prefetches (default FIFO)")
    add_json_opt(p, "the results", "TRACE.cache.json")
    p.add_argument("--plot", type=path, help="PNG (default beside the JSON)")
    p.set_defaults(func=cmd_cache_sim)
