"""Helpers every command family shares: the option vocabulary's types, JSON output (input:
lexi_gguf.read_json), the allocation and calibration options.

One vocabulary: an option spelt the same on two commands means the same thing and takes the same type
(CONTRIBUTING.md, "Options", lists every one; tests/test_vocabulary.py walks every sub-command and fails
on a difference or an option missing from that table). The types are the functions below, named in
TYPE_NAMES."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import LexiError

FULL, DEFAULT = "full", "default"      # runtime.budgets' names, spelt here so the parser loads nothing


def path(s: str) -> str:
    """A file or directory path (`-`: stdout, where an option says so)."""
    if not s:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return s


def calib_source(s: str) -> str:
    """A calibration text: a UTF-8 file's path, or `builtin` (Python's own documentation, no file)."""
    return path(s)


def budget(s: str) -> float | str:
    """A budget: a fraction in (0, 1] of the model's base active experts (MoE layers x base k), or `full`
    (the model's own k in every layer) or `default` (what the file stores as its default), or
    `k=K1,K2,...` (any counts, one per MoE layer: run as they are, not allocated)."""
    t = s.strip().lower()
    if t in (FULL, DEFAULT) or t.startswith("k="):
        return t
    try:
        x = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], 'full', 'default' or k=K1,K2,..., got {s!r}") from None
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"{s} must be a fraction of the base budget in (0, 1]")
    return x


def with_counts(args) -> float | str | None:
    """--budget, or --k K1,K2,... as the budget spec k=K1,K2,... (the counts run as given)."""
    ks = getattr(args, "k", None)
    if ks:
        if getattr(args, "budget", None) is not None or getattr(args, "no_lexi", False):
            raise LexiError("--k runs the counts given: leave out --budget / --no-lexi")
        return "k=" + ",".join(str(k) for k in ks)
    return getattr(args, "budget", None)


def budget_name(b: float | str | None) -> str | None:
    """A parsed --budget as runtime.budgets names it ("0.75", "full", "default"), for commands that run a
    stored budget."""
    return None if b is None else b if isinstance(b, str) else f"{b:g}"


def budget_fraction(b: float | str | None, what: str = "--budget") -> float | None:
    """A parsed --budget as the fraction a command allocates at: `full` is 1; `default` names a stored
    budget, which a command that writes the allocation has not got yet."""
    if b is None or isinstance(b, float):
        return b
    if b == FULL:
        return 1.0
    raise LexiError(f"{what} {b}: this command allocates a new budget; give it as a fraction, e.g. 0.75")


def names(s: str) -> list[str]:
    """A comma-separated list of names."""
    out = [x.strip() for x in s.split(",") if x.strip()]
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {s!r}")
    return out


def prefetch_modes(s: str) -> list[str]:
    """Expert prefetch modes (runtime.options.PREFETCH_MODES), comma-separated where a command compares
    several (`bench --mem-limit`); one elsewhere."""
    from ..runtime.options import PREFETCH_MODES
    out = names(s)
    bad = [m for m in out if m not in PREFETCH_MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown prefetch mode {bad[0]!r}: use {', '.join(PREFETCH_MODES)}")
    return out


def one_prefetch_mode(modes: list[str]) -> str:
    if len(modes) != 1:
        raise LexiError(f"--prefetch {','.join(modes)}: this command runs one mode (several are compared by "
                        "`bench --mem-limit`)")
    return modes[0]


def ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


TYPE_NAMES = {None: "text", str: "text", int: "int", float: "float", path: "path", calib_source: "path or builtin", budget: "budget", ints: "ints",
              floats: "floats", names: "names", prefetch_modes: "prefetch modes"}


def type_name(action: argparse.Action) -> str:
    """What an option takes, in CONTRIBUTING.md's words: flag, int, path, [path] (value optional), text ...
    (one or more), one of a, b (choices)."""
    if action.nargs == 0:
        return "flag"
    if action.choices is not None:
        base = "one of " + ", ".join(str(c) for c in action.choices)
    else:
        base = TYPE_NAMES.get(action.type, getattr(action.type, "__name__", str(action.type)))
    if action.nargs == "?":
        return f"[{base}]"
    if action.nargs in ("+", "*"):
        return f"{base} ..."
    return base


def add_json_opt(p, what: str, default: str | None = None) -> None:
    """--json [PATH]: where the results JSON goes; `-` or no PATH: stdout (the human-readable lines then go
    to stderr)."""
    p.add_argument("--json", type=path, nargs="?", const="-", metavar="PATH",
                   help=f"write {what} as JSON to PATH; '-' or no PATH: stdout" + (f" (default {default})" if default else ""))


def human(args):
    """Where a command's human-readable lines go: stderr when --json - puts the JSON on stdout."""
    return sys.stderr if getattr(args, "json", None) == "-" else sys.stdout


def write_json(obj: dict, out: str | Path, force: bool = True) -> None:
    """obj as JSON at out (atomic); out '-': stdout."""
    if str(out) == "-":
        sys.stdout.write(json.dumps(obj, indent=2) + "\n")
        sys.stdout.flush()
        return
    from ..gguf.writer import atomic_output
    with atomic_output(out, force=force) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def allowed_k(args) -> list[int] | None:
    from ..method.backends import safe_k
    allowed = args.allowed_k
    if getattr(args, "backend_safe", None):
        s = safe_k(args.backend_safe)        # None: the backend runs any k
        if s is not None:
            allowed = sorted(set(allowed) & s) if allowed else sorted(s)
    return allowed


WEIGHT_NORM_HELP = ("how a layer running fewer experts than trained weights them (normalising archs): renorm "
                    "(divide by their own sum, default) or base (by the trained top-k's sum: no inflation); "
                    "written as lexi.weight_norm and profiled the same way")


def calib_text(args) -> str | None:
    if args.calib is None:
        return None
    if args.calib == "builtin":          # no file to bring: the standard library's documentation (no download)
        from ..testbeds.builtin import corpus
        return corpus()[0]
    from ..method.calib import read_text
    return read_text(args.calib)


def add_calib_opts(p) -> None:
    p.add_argument("--calib", type=calib_source, metavar="TEXT", help="calibrated profiling while the model reads this UTF-8 text, "
                   "or `builtin`: the documentation that ships with Python itself (pydoc topics and standard-library "
                   "docstrings, the built-in models' training text; never their evaluation text) "
                   "(default: data-free, N(0,1) inputs)")
    p.add_argument("--calib-metric", default="kld", choices=["kld", "deviation"],
                   help="with --calib: kld (default) measures each layer and k end to end, one pass over the text "
                   "per (MoE layer, k); deviation feeds Stage 1 the captured MoE inputs (one pass)")
    p.add_argument("--calib-tokens", type=int, help="calibration tokens to use (default: 1024 for kld, 4096 for deviation)")


def outputs(args, stem: str) -> tuple[Path | str, Path]:
    """The results JSON (MODEL.<stem>.json unless --json; '-' is stdout) and the PNG (--plot, else beside
    the JSON, else beside the model)."""
    default = Path(args.model).with_suffix(f".{stem}.json")
    js = args.json if args.json == "-" else Path(args.json) if args.json else default
    png = Path(args.plot) if args.plot else (default if js == "-" else js).with_suffix(".png")
    return js, png


def lines(path: str, what: str) -> list[str]:
    p = Path(path)
    if not p.exists():
        raise LexiError(f"{p} does not exist; give a UTF-8 text file with {what}")
    return p.read_text(errors="replace").splitlines()


def add_solver_opts(p) -> None:
    """How a budget is allocated: solver, which k are allowed, the smallest k, the seed."""
    p.add_argument("--solver", default="exact", choices=["exact", "evolutionary"])
    p.add_argument("--allowed-k", type=ints, help="only these k, e.g. 1,2,4,8")
    p.add_argument("--backend-safe", choices=["cpu", "cuda", "metal", "vulkan"],
                   help="only k values this backend's MoE kernels run (metal: 1,2,4,5,6,8,10,16,22; the others: "
                   "any k); docs/backends.md")
    p.add_argument("--min-k", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)


def add_alloc_opts(p, required_budget: bool) -> None:
    """The budget, as a fraction, a total or an average k (one of them), and the solver options."""
    g = p.add_mutually_exclusive_group(required=required_budget)
    g.add_argument("--budget", type=budget, help="fraction of the base budget (layers x base k); full = 1")
    g.add_argument("--total", type=int, help="total active experts over MoE layers")
    g.add_argument("--avg-k", type=float, help="average active experts per MoE layer")
    add_solver_opts(p)


def add_device_opts(p) -> None:
    """Where layers and weights live: offloaded layers, RPC servers on other machines (docs/rpc.md), their
    shares, and whether CPU weights are repacked or read in place from the file (docs/memory.md)."""
    p.add_argument("--n-gpu-layers", "-ngl", type=int,
                   help="layers to offload to GPUs / RPC servers (default 0; with --rpc all of them)")
    p.add_argument("--rpc", metavar="HOST:PORT[,...]",
                   help="llama.cpp RPC servers (`lexi-gguf rpc-server` there) to put the offloaded layers on")
    p.add_argument("--tensor-split", type=floats, metavar="W,W,...",
                   help="share of the offloaded layers per device (RPC servers first, in --rpc order)")
    p.add_argument("--n-cpu-moe", type=int, default=0, metavar="N",
                   help="keep the routed experts of the first N layers on the CPU while --n-gpu-layers offloads the "
                   "rest of them (llama.cpp's --n-cpu-moe; 99: every layer's); per-layer k is unchanged")
    p.add_argument("--override-tensor", "-ot", action="append", metavar="PATTERN=BUFFER",
                   help="put tensors matching PATTERN in that buffer type (llama.cpp's -ot, e.g. exps=CPU; repeatable)")
    p.add_argument("--repack", default="auto", choices=["auto", "on", "off"],
                   help="ggml's repacked CPU weight layouts: off = read every weight in place from the mapped "
                   "file (pages, prefetch); auto (default) = off with --prefetch or a model larger than memory")
    p.add_argument("--expert-cache", metavar="SIZE", help="keep routed experts in memory within SIZE (4G, 3.5GiB, "
                   "or auto: what MemAvailable spares), evicting by --cache-policy (docs/memory.md); no cgroup, no root")
    p.add_argument("--cache-policy", choices=["nextuse", "lru", "lfu", "learned", "nextuse:k", "lru:k", "lfu:k",
                                              "learned:k"],
                   help="the expert cache's eviction policy (default nextuse: docs/caching.md); learned: nextuse plus "
                   "look-ahead prefetch of the next layers' guessed experts where the clock says it pays; POLICY:k "
                   "splits SIZE into per-layer quotas following each layer's k")
    p.add_argument("--cache-predictor", metavar="PRED",
                   help="what --cache-policy learned guesses with: coactivation (default, learned online), previous, "
                   "TRACE.npz (coactivation counted on it first) or PRED.pt (`predictor train --kind sequence`)")


def load_options(args, prefetch: str = "off"):
    """The runtime.options.LoadOptions a command hands to every load it makes (and to llama.cpp's tools it
    runs): the device options above, --threads, and the one prefetch mode. Nothing is connected or set
    here: the load registers the RPC servers its options name."""
    from ..runtime.options import LoadOptions
    ngl = args.n_gpu_layers if args.n_gpu_layers is not None else -1 if args.rpc else 0
    return LoadOptions(n_gpu_layers=ngl, rpc=args.rpc or (), tensor_split=args.tensor_split, repack=args.repack,
                       prefetch=prefetch, threads=getattr(args, "threads", None),
                       expert_cache=getattr(args, "expert_cache", None), cache_policy=getattr(args, "cache_policy", None),
                       cache_predictor=getattr(args, "cache_predictor", None),
                       cpu_moe=getattr(args, "n_cpu_moe", 0) or 0, override_tensor=tuple(getattr(args, "override_tensor", None) or ()))
