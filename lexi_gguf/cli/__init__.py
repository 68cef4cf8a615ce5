"""lexi-gguf command line. Every user-facing failure is a LexiError: one line, exit status 2.

One module per command family (setup, method, export, run, measure, caching); each registers its
sub-commands on the parser here."""
from __future__ import annotations

import argparse
import sys

from .. import LexiError, __version__
from . import caching, export, measure, method, run, setup

FAMILIES = (setup, method, export, run, measure, caching)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lexi-gguf", description=__doc__.split("\n")[0])
    ap.add_argument("--version", action="version", version=f"lexi-gguf {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for family in FAMILIES:
        family.register(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LexiError as e:
        print(f"lexi-gguf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lexi-gguf: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
