"""`chat` and `serve`: a lexi GGUF in use."""
from __future__ import annotations



def cmd_chat(args) -> None:
    from ..serve.chat import chat
    chat(args.model, budget=args.budget, no_lexi=args.no_lexi, n_gpu_layers=args.n_gpu_layers,
         threads=args.threads, max_tokens=args.max_tokens, n_ctx=args.ctx, temperature=args.temperature,
         seed=args.seed, prefetch=args.prefetch)


def cmd_serve(args) -> None:
    from ..serve import serve
    serve(args.model, budget=args.budget, host=args.host, port=args.port, n_ctx=args.ctx, threads=args.threads,
          n_gpu_layers=args.n_gpu_layers, api_key=args.api_key, prefetch=args.prefetch)


def register(sub) -> None:
    p = sub.add_parser("chat", help="streaming local chat (stdin may be piped; /budget X switches in place)")
    p.add_argument("model")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget", type=float, help="run a budget stored in the file's ladder")
    g.add_argument("--no-lexi", action="store_true", help="ignore the per-layer counts (model's own k)")
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefetch", default="off", choices=["off", "chosen", "guess"],
                   help="expert prefetch from the mmapped file (docs/memory.md): off, chosen experts, + next-layer guess")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible local server; every stored budget is a model id")
    p.add_argument("model")
    p.add_argument("--budget", help="the budget of the plain model id: a stored fraction, 'full' or 'default'")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default loopback; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", help="require this bearer token")
    p.add_argument("--prefetch", default="off", choices=["off", "chosen", "guess"],
                   help="expert prefetch from the mmapped file (docs/memory.md): off, chosen experts, + next-layer guess")
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--ctx", type=int, default=2048)
    p.set_defaults(func=cmd_serve)
