"""lexi-gguf command line (temporary minimal version; subcommands are added per pipeline stage)."""
from __future__ import annotations
import argparse, sys
from . import LexiError

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lexi-gguf")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-runtime")
    b.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "metal"])
    b.add_argument("--jobs", type=int)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build-runtime":
            from .build import build_runtime
            build_runtime(args.backend, args.jobs)
    except LexiError as e:
        print(f"lexi-gguf: error: {e}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
