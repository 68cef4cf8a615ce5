"""`lexi-gguf report`: docs/results.md, generated from bench/results/*.json.

One section per results family (the bench that wrote it: `kind` in the JSON, or the file name's stem for
files saved before results carried it), one block per file, each stamped with where and on what it ran:
CPU model string, class, cores, date, commit, patch hash and llama.cpp commit ("not recorded" where an
older file lacks one). Nothing in docs/results.md is typed by hand.

Extending it: a family's tables come from the function registered for its kind in RENDERERS
(`@family("kind", "Title", "bench/bench_x.py", "docs/x.md", "what it measures")`); a kind with no
renderer is shown by `generic` (its scalars, its lists of records and its tables of counts), so a new
results family appears in the report the day its first file is committed. A renderer that cannot read
a file (a field renamed, say) falls back to `generic` for that file and says so.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ... import LexiError
from . import expertcache, pertoken, quality, speed, truesize, vulkan  # noqa: F401  (they register their families)
from .markdown import LEGACY_MACHINE, MACHINE_ID, NR, RENDERERS, Family, family, generic, stamp, table

__all__ = ["RENDERERS", "Family", "family", "family_of", "generic", "render", "stamp", "write_report"]

# the order of the report; families without a renderer follow, by name
ORDER = ("runtime", "switch", "cpu-paths", "profile", "apply-quants", "seeds", "weight-norm", "calib", "pertoken", "caching",
         "idpredict", "policies", "memlimit", "expert-cache", "repack", "serve-load", "rpc", "mutation", "readback",
         "synth")


# ---------------------------------------------------------------------------------------------------
# which family

def family_of(path: Path, data: dict) -> tuple[str, str | None]:
    """(kind, variant) of a results file: its own `kind` / `variant`, else from its file name."""
    if isinstance(data.get("kind"), str) and data["kind"]:
        return data["kind"], data.get("variant") or None
    stem = path.stem
    legacy = LEGACY_MACHINE.search(stem)
    new = None if legacy else MACHINE_ID.search(stem)
    if legacy or new:
        stem = stem[:(legacy or new).start()]
    for kind in sorted(RENDERERS, key=len, reverse=True):
        if stem == kind or stem.startswith(kind + "-"):
            # a new-style name has the CPU slug between variant and class: only the JSON knows the variant
            return kind, (stem[len(kind) + 1:] or None) if not new else None
    return stem, None


# ---------------------------------------------------------------------------------------------------
# the document

def load_results(results_dir: Path) -> list[tuple[Path, dict]]:
    out = []
    for p in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise LexiError(f"{p} is not a readable JSON results file: {e}") from None
        if not isinstance(data, dict):
            raise LexiError(f"{p} holds a JSON {type(data).__name__}, not a results object")
        out.append((p, data))
    return out


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).strip().replace(" ", "-")


def render_file(path: Path, data: dict, link_base: Path) -> str:
    kind, variant = family_of(path, data)
    fam = RENDERERS.get(kind)
    rel = os.path.relpath(path, link_base)
    png = path.with_suffix(".png")
    links = f"[`{path.name}`]({rel})" + (f" · [plot]({os.path.relpath(png, link_base)})" if png.exists() else "")
    head = f"### {path.stem}\n\n"
    blocks = [stamp(data) + " · " + links]
    try:
        blocks += fam.render(data) if fam else generic(data)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as e:
        blocks.append(f"(the {kind} renderer could not read this file: {type(e).__name__} {e}; generic view)")
        blocks += generic(data)
    return head + "\n\n".join(blocks)


def render(results_dir: Path, link_base: Path | None = None) -> str:
    """The whole docs/results.md for the results files in results_dir; links relative to link_base."""
    results_dir = Path(results_dir)
    link_base = Path(link_base) if link_base else Path.cwd()
    files = load_results(results_dir)
    groups: dict[str, list[tuple[Path, dict]]] = {}
    for p, d in files:
        groups.setdefault(family_of(p, d)[0], []).append((p, d))
    kinds = [k for k in ORDER if k in groups] + sorted(k for k in groups if k not in ORDER)
    machines: dict[tuple, int] = {}
    for _, d in files:
        m = d.get("machine") if isinstance(d.get("machine"), dict) else {}
        key = (m.get("cpu") or NR, m.get("cpu_class") or NR, m.get("cores") or NR, m.get("id") or NR)
        machines[key] = machines.get(key, 0) + 1
    rel = os.path.relpath(results_dir, link_base)
    out = ["# Results",
           f"Generated by `lexi-gguf report` (`make report`) from the {len(files)} files in [`{rel}/`]({rel}/): "
           "do not edit by hand. Each block says where it ran (CPU model string, class, cores) and on what (date, "
           "commit, the runtime's patch hash, the pinned llama.cpp commit); files saved before results carried "
           "those say \"not recorded\". A bench writes bench/results/<kind>[-<variant>]-<machine id>.json "
           "(`python bench/bench_NAME.py`; CONTRIBUTING.md), so machines never overwrite each other.",
           "Machines:\n\n" + table(["CPU model string", "class", "cores", "machine id", "files"],
                                   [[f"`{a}`", b, c, f"`{i}`" if i != NR else i, n]
                                    for (a, b, c, i), n in sorted(machines.items(), key=lambda x: -x[1])]),
           "Contents:\n\n" + "\n".join(
               f"- [{RENDERERS[k].title if k in RENDERERS else k}](#{_anchor(RENDERERS[k].title if k in RENDERERS else k)})"
               f" ({len(groups[k])} file{'s' if len(groups[k]) > 1 else ''})" for k in kinds)]
    for k in kinds:
        fam = RENDERERS.get(k)
        title = fam.title if fam else k
        intro = []
        if fam:
            what = fam.about[0].upper() + fam.about[1:] if fam.about else ""
            src = f"`{fam.script}`" if fam.script and not fam.script.startswith("`") else (fam.script or "")
            doc = results_dir.resolve().parent.parent / fam.doc if fam.doc else None
            intro.append(f"{what}." + (f" From {src}." if src else "")
                         + (f" Discussed in [{fam.doc}]({os.path.relpath(doc, link_base)})." if doc and doc.exists() else ""))
        else:
            intro.append("No renderer for this family yet (lexi_gguf/measure/report.py): the generic view.")
        out.append(f"## {title}\n\n" + "\n\n".join(intro))
        for p, d in groups[k]:
            out.append(render_file(p, d, link_base))
    return "\n\n".join(out) + "\n"


def checkout_root() -> Path:
    return Path(__file__).resolve().parents[2]


def default_results() -> Path:
    """The checkout's bench/results (the package in a checkout), else ./bench/results."""
    for root in (checkout_root(), Path.cwd()):
        if (root / "bench" / "results").is_dir():
            return root / "bench" / "results"
    raise LexiError("no bench/results directory here or in the checkout: pass --results DIR")


def write_report(results_dir: Path | None = None, output: str | Path | None = None, *, check: bool = False) -> str:
    """Render and write (or with check, compare); output '-' is stdout. Returns what was written / the path."""
    import sys
    results_dir = Path(results_dir) if results_dir else default_results()
    if output is None:
        docs = results_dir.resolve().parent.parent / "docs"
        output = docs / "results.md" if docs.is_dir() else "-"
    if output == "-":
        text = render(results_dir, Path.cwd())
        if check:
            raise LexiError("--check compares with a file: give -o PATH")
        sys.stdout.write(text)
        return "-"
    out = Path(output)
    text = render(results_dir, out.resolve().parent)
    if check:
        if not out.exists() or out.read_text() != text:
            raise LexiError(f"{out} is not what `lexi-gguf report` makes from {results_dir}: run `make report` "
                            "and commit it")
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return str(out)
