"""`chat`, `serve` and `rpc-server`: a lexi GGUF in use, on one machine or several."""
from __future__ import annotations

from .common import FULL, add_device_opts, budget, budget_name, ints, load_options, one_prefetch_mode, prefetch_modes, with_counts

PREFETCH_HELP = ("expert prefetch from the mmapped file (docs/memory.md): off, chosen experts, + guesses for the "
                 "next MoE layer (guess) or two (guess2)")


def cmd_chat(args) -> None:
    from ..serve.chat import chat
    b = with_counts(args)     # chat takes a stored fraction, k=..., or no_lexi for the model's own k
    chat(args.model, budget=None if b in (None, FULL, "default") else b, no_lexi=args.no_lexi or b == FULL,
         options=load_options(args, one_prefetch_mode(args.prefetch)), max_tokens=args.max_tokens, n_ctx=args.ctx,
         temperature=args.temperature, seed=args.seed)


def cmd_serve(args) -> None:
    from .. import LexiError
    options = load_options(args, one_prefetch_mode(args.prefetch))
    if args.engine == "llama-server":
        from ..serve import llama_server
        llama_server.serve(args.model, budget=budget_name(with_counts(args)), host=args.host, port=args.port, n_ctx=args.ctx,
                           parallel=args.parallel or 4, options=options, api_key=args.api_key)
        return
    if args.parallel not in (None, 1):
        raise LexiError("the python engine answers one request at a time (queued); for parallel slots and "
                        "continuous batching use --engine llama-server")
    from ..serve import serve
    serve(args.model, budget=budget_name(with_counts(args)), host=args.host, port=args.port, n_ctx=args.ctx,
          options=options, api_key=args.api_key)


def cmd_rpc_server(args) -> None:
    import os
    import sys

    from ..runtime import rpc
    cmd = rpc.server_command(args.host, args.port, args.threads, args.cache)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: the RPC server on {args.host} runs anything a client sends, without authentication: "
              "only on a network you trust", file=sys.stderr)
    print("$ " + " ".join(cmd), flush=True)
    os.execv(cmd[0], cmd)     # the server itself, in the foreground (Ctrl-C stops it)


def register(sub) -> None:
    p = sub.add_parser("chat", help="streaming local chat (stdin may be piped; /budget X switches in place)")
    p.add_argument("model")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget", type=budget, help="run a budget stored in the file's ladder, 'full' or 'default'")
    g.add_argument("--no-lexi", action="store_true", help="ignore the per-layer counts (model's own k)")
    g.add_argument("--k", type=ints, help="run these counts, one per MoE layer (none stored in the file needed)")
    add_device_opts(p)
    p.add_argument("--threads", type=int)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefetch", type=prefetch_modes, default=["off"], help=PREFETCH_HELP)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible local server; every stored budget is a model id")
    p.add_argument("model")
    p.add_argument("--budget", type=budget, help="the budget of the plain model id: a stored fraction, 'full' or 'default'")
    p.add_argument("--k", type=ints, help="the plain model id runs these counts, one per MoE layer; any request may "
                   "name its own as MODEL@k=K1,K2,...")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default loopback; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", help="require this bearer token")
    p.add_argument("--engine", default="python", choices=["python", "llama-server"],
                   help="python: llama-cpp-python, every budget switched in one loaded model, one request at a "
                   "time; llama-server: llama.cpp's server, parallel slots and continuous batching, one process "
                   "per budget (docs/serving.md)")
    p.add_argument("--parallel", type=int, help="llama-server: slots per budget (default 4)")
    p.add_argument("--prefetch", type=prefetch_modes, default=["off"], help=PREFETCH_HELP)
    add_device_opts(p)
    p.add_argument("--threads", type=int)
    p.add_argument("--ctx", type=int, default=2048, help="context per request (per slot with llama-server)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("rpc-server", help="lend this machine's backend to a client's --rpc (llama.cpp ggml-rpc-server)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default loopback; 0.0.0.0 for other machines)")
    p.add_argument("--port", type=int, default=50052)
    p.add_argument("--threads", type=int, help="CPU threads for the CPU device")
    p.add_argument("--cache", action="store_true", help="keep received tensors in a local file cache (faster reloads)")
    p.set_defaults(func=cmd_rpc_server)
