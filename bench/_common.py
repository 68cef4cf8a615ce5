"""What every bench shares: its command line basics, where it ran, what it ran on, and how its results
are saved (JSON + PNG) so that no run overwrites another machine's and every number says where it
came from.

A bench script starts with

    if __package__ in (None, ""):          # run as a file: python bench/bench_NAME.py
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import _common as C

then `ap = C.parser(__doc__)` (adds --threads, --quick, --results, --force), `run = C.Run(args, "NAME")`
before any work (it refuses at once what it would refuse at the end), and `run.save(res)` /
`run.plot(fig)` at the end. The saved JSON is the bench's own dict plus `kind`, `variant`, `date`,
`commit`, `dirty`, `patch_hash`, `llama_cpp_commit` and `machine` (runtime.cpu.machine(), with its
`id`), and it holds no absolute path of this machine (paths are made relative to the checkout, or
cut to their file name). `lexi-gguf report` renders bench/results/*.json into docs/results.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"          # tracked: the measured history, rendered by `lexi-gguf report`
QUICK_RESULTS = ROOT / "out" / "bench-quick"  # untracked: what --quick (and `make bench`) writes
WORK = ROOT / "out" / "bench"                 # untracked: bench models and scratch files

if str(ROOT) not in sys.path:                 # the checkout's package, not another installed copy
    sys.path.insert(0, str(ROOT))


def parser(doc: str | None, *, threads: int = 2) -> argparse.ArgumentParser:
    """An ArgumentParser with the options every bench has (one vocabulary: `--threads`, `--quick`,
    `--results DIR`, `--force`)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("every bench (bench/_common.py)")
    g.add_argument("--threads", type=int, default=threads, help=f"CPU threads (default {threads})")
    g.add_argument("--quick", action="store_true",
                   help="a short run of the same code path (what `make bench` runs): small sizes, one repetition; "
                        "its results go to out/bench-quick/, never to bench/results/")
    g.add_argument("--results", metavar="DIR",
                   help="where the results JSON and PNG go (default bench/results/; out/bench-quick/ with --quick)")
    g.add_argument("--force", "--allow-dirty", dest="force", action="store_true",
                   help="write into a tracked results file although the checkout has uncommitted changes "
                        "(the JSON then says dirty: true)")
    return ap


# ---------------------------------------------------------------------------------------------------
# where and on what it ran

def git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def dirty() -> bool:
    """Tracked files with uncommitted changes (untracked files do not count)."""
    return bool(git("status", "--porcelain", "--untracked-files=no"))


def tracked(path: Path) -> bool:
    return git("ls-files", "--error-unmatch", str(path)) is not None


def machine() -> dict:
    from lexi_gguf.runtime.cpu import machine as m
    return m()


def machine_id() -> str:
    from lexi_gguf.runtime.cpu import machine_id as mid
    return mid()


def provenance() -> dict:
    """What a result ran on: date (UTC), the checkout's commit (and whether it had uncommitted changes),
    the runtime's patch hash (from the runtime record `make setup` writes; else the checkout's patches,
    said so), the pinned llama.cpp and llama-cpp-python, and the machine."""
    from lexi_gguf.runtime.build import RUNTIME_RECORD, read_pin
    pin = read_pin()
    try:
        rec = json.loads(RUNTIME_RECORD.read_text())
    except (OSError, ValueError):
        rec = {}
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git("rev-parse", "--short=12", "HEAD"), "dirty": dirty(),
            "patch_hash": rec.get("patch_hash") or pin.patch_hash,
            "patch_hash_of": "runtime" if rec.get("patch_hash") else "checkout (no runtime record)",
            "llama_cpp_commit": rec.get("llama_cpp_commit") or pin.llama_cpp_commit,
            "llama_cpp_python": rec.get("version") or pin.version,
            "runtime_backend": rec.get("backend"),
            "machine": machine()}


# ---------------------------------------------------------------------------------------------------
# no absolute path of this machine in a saved result

def _prefixes() -> list[tuple[str, bool]]:
    """(prefix, relative-to-checkout?) longest first: the checkout, the lexi-gguf cache, home, temp, venv."""
    from lexi_gguf.runtime.build import cache_root
    out = {str(ROOT): True}
    for p in (cache_root(), Path.home(), Path(tempfile.gettempdir()), Path(sys.prefix)):
        out.setdefault(str(Path(p).resolve()), False)
        out.setdefault(str(p), False)
    return sorted(((p, rel) for p, rel in out.items() if len(p) > 1), key=lambda x: -len(x[0]))


def scrub_paths(obj, prefixes: list[tuple[str, bool]] | None = None):
    """A copy of obj whose strings carry no absolute path of this machine: under the checkout a path
    becomes relative to it, elsewhere (cache, home, temp, any other existing absolute path) its file
    name."""
    prefixes = _prefixes() if prefixes is None else prefixes

    def fix(s: str) -> str:
        if s.startswith("/") and " " not in s and (os.path.exists(s) or os.path.exists(os.path.dirname(s))):
            p = Path(s)
            try:
                return str(p.resolve().relative_to(ROOT.resolve()))
            except ValueError:
                return p.name or s
        for pre, rel in prefixes:
            pat = re.compile(r"(?<![\w.-])" + re.escape(pre) + r"(?![\w.-])(/[^\s'\",;)\]]*)?")
            s = pat.sub(lambda m: ((m.group(1) or "/").lstrip("/") or ".") if rel
                        else (Path(m.group(1)).name if m.group(1) else "~"), s)
        return s
    if isinstance(obj, str):
        return fix(obj)
    if isinstance(obj, dict):
        return {k: scrub_paths(v, prefixes) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_paths(v, prefixes) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------
# one run's files

def result_path(kind: str, variant: str | None = None, directory: Path = RESULTS) -> Path:
    """<directory>/<kind>[-<variant>]-<machine id>.json: one file per bench, variant and machine."""
    return Path(directory) / ("-".join(x for x in (kind, variant, machine_id()) if x) + ".json")


class Run:
    """Where one bench run writes: <results dir>/<kind>[-<variant>]-<machine id>.json and .png beside it.
    Made before the work, so a refusal (a tracked file and a dirty checkout, without --force) costs
    nothing."""

    def __init__(self, args, kind: str, variant: str | None = None):
        self.kind, self.variant = kind, variant or None
        self.quick, self.force = bool(getattr(args, "quick", False)), bool(getattr(args, "force", False))
        d = Path(args.results) if getattr(args, "results", None) else (QUICK_RESULTS if self.quick else RESULTS)
        self.json = result_path(kind, self.variant, d)
        self.png = self.json.with_suffix(".png")
        self.check()

    def check(self) -> None:
        if self.force or not self.json.exists() or not tracked(self.json) or not dirty():
            return
        raise SystemExit(f"bench: {_rel(self.json)} is a tracked results file and this checkout has uncommitted "
                         "changes: commit them first (a result records the commit it ran on), write elsewhere "
                         "(--results DIR, --quick) or pass --force / --allow-dirty")

    def save(self, res: dict) -> Path:
        """Print each target's verdict and write the results with their provenance (atomically)."""
        for k, v in res.get("targets_met", {}).items():
            print(f"target {k}: {'met' if v else 'NOT met'}")
        self.check()
        prov = provenance()
        out = {"kind": self.kind, "variant": self.variant, **prov, "quick": self.quick}
        out.update(scrub_paths({k: v for k, v in res.items() if k not in out}))
        self.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json.with_name(f".{self.json.name}.tmp")
        tmp.write_text(json.dumps(out, indent=2) + "\n")
        tmp.replace(self.json)
        print(f"results -> {_rel(self.json)}")
        return self.json

    def plot(self, fig, path: Path | None = None) -> Path:
        """Save a matplotlib figure beside the JSON (or at path) and close it."""
        out = Path(path) if path else self.png
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(out, dpi=110)
        pyplot().close(fig)
        print(f"plot -> {_rel(out)}")
        return out


def pyplot():
    from lexi_gguf.measure.plots import pyplot as p
    return p()


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)
