"""Helpers every command family shares: argument types, JSON output (input: lexi_gguf.read_json),
the allocation and calibration options."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import LexiError


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


def write_json(obj: dict, out: str | Path, force: bool = True) -> None:
    from ..gguf.writer import atomic_output
    with atomic_output(out, force=force) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def allowed_k(args) -> list[int] | None:
    from ..method.backends import safe_k
    allowed = args.allowed_k
    if getattr(args, "backend_safe", None):
        s = safe_k(args.backend_safe)
        allowed = sorted(set(allowed) & s) if allowed else sorted(s) if s else allowed
    return allowed


WEIGHT_NORM_HELP = ("how a layer running fewer experts than trained weights them (normalising archs): renorm "
                    "(divide by their own sum, default) or base (by the trained top-k's sum: no inflation); "
                    "written as lexi.weight_norm and profiled the same way")


def calib_text(args) -> str | None:
    if args.calib is None:
        return None
    from ..method.calib import read_text
    return read_text(args.calib)


def add_calib_opts(p) -> None:
    p.add_argument("--calib", metavar="TEXT", help="calibrated profiling while the model reads this UTF-8 text "
                   "(default: data-free, N(0,1) inputs)")
    p.add_argument("--calib-metric", default="kld", choices=["kld", "deviation"],
                   help="with --calib: kld (default) measures each layer and k end to end, one pass over the text "
                   "per (MoE layer, k); deviation feeds Stage 1 the captured MoE inputs (one pass)")
    p.add_argument("--calib-tokens", type=int, help="calibration tokens to use (default: 1024 for kld, 4096 for deviation)")


def outputs(args, stem: str) -> tuple[Path, Path]:
    js = Path(args.json) if args.json else Path(args.model).with_suffix(f".{stem}.json")
    png = Path(args.plot) if args.plot else js.with_suffix(".png")
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
    p.add_argument("--backend-safe", choices=["cpu", "cuda", "metal"],
                   help="only k values this backend runs (metal: 1,2,4,5,6,8,10,16,22)")
    p.add_argument("--min-k", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)


def add_alloc_opts(p, required_budget: bool) -> None:
    """The budget, as a fraction, a total or an average k (one of them), and the solver options."""
    g = p.add_mutually_exclusive_group(required=required_budget)
    g.add_argument("--budget", type=float, help="fraction of the base budget (layers x base k)")
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
    p.add_argument("--repack", default="auto", choices=["auto", "on", "off"],
                   help="ggml's repacked CPU weight layouts: off = read every weight in place from the mapped "
                   "file (pages, prefetch); auto (default) = off with --prefetch or a model larger than memory")


def setup_devices(args) -> int:
    """Connect --rpc servers (process-wide, as llama.cpp does), set the repack mode and tensor split for
    every load; returns the offload count the command loads with."""
    from ..runtime import placement, rpc
    placement.set_default(args.repack)
    if args.rpc:
        rpc.connect(args.rpc, args.tensor_split)
    elif args.tensor_split:
        rpc.set_tensor_split(args.tensor_split)
    if args.n_gpu_layers is not None:
        return args.n_gpu_layers
    return -1 if args.rpc else 0
