"""Markdown for the results report: the renderer registry (`family`), number and table formatting, the
stamp saying where a result ran, and `generic`, which shows any results JSON (the fallback for a family
with no renderer of its own)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

NR = "not recorded"
# what a results file says about where it ran, rather than what it measured
PROVENANCE = ("kind", "variant", "date", "commit", "dirty", "patch_hash", "patch_hash_of", "llama_cpp_commit",
              "llama_cpp_python", "runtime_backend", "machine", "quick")
# result file names before issue 34: <name>-<platform.machine()>[-<cpu class>]-<cores>c.json
LEGACY_MACHINE = re.compile(r"-(x86_64|amd64|aarch64|arm64|armv7l|ppc64le|s390x)(-(avx2|avx512|amx))?-(\d+)c$",
                            re.IGNORECASE)
# since issue 34: <kind>[-<variant>]-<machine id>.json, machine id = <cpu slug>-<class>-<cores>c-<flags hash>;
# the CPU slug has dashes of its own, so a name alone does not say where the variant ends (the JSON does)
MACHINE_ID = re.compile(r"-[a-z0-9_]+-\d+c-[0-9a-f]{6}$")


@dataclass(frozen=True)
class Family:
    kind: str
    title: str
    script: str | None
    doc: str | None
    about: str
    render: Callable[[dict], list[str]]


RENDERERS: dict[str, Family] = {}


def family(kind: str, title: str, script: str | None = None, doc: str | None = None, about: str = ""):
    """Register a renderer: data (one results file) -> markdown blocks (tables, lines)."""
    def deco(fn):
        RENDERERS[kind] = Family(kind, title, script, doc, about, fn)
        return fn
    return deco


# ---------------------------------------------------------------------------------------------------
# formatting

def num(x, fmt: str = ".2f", none: str = "-") -> str:
    if x is None:
        return none
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        try:
            return format(x, fmt)
        except (TypeError, ValueError):
            return str(x)
    return str(x)


def rng(r: dict, key: str, fmt: str = ".1f") -> str:
    """A median with its min-max, when the row has them (<key>_tps, <key>_min, <key>_max)."""
    mid = r.get(f"{key}_tps")
    lo, hi = r.get(f"{key}_min"), r.get(f"{key}_max")
    if lo is None or hi is None or lo == hi:
        return num(mid, fmt)
    return f"{num(mid, fmt)} ({num(lo, fmt)}-{num(hi, fmt)})"


def cell(x) -> str:
    """Any JSON value in one table cell."""
    if isinstance(x, float):
        return num(x, ".4g")
    if isinstance(x, (list, tuple)):
        if all(not isinstance(v, (dict, list)) for v in x):
            s = ", ".join(cell(v) for v in x)
            return s if len(s) <= 80 else s[:77] + "..."
        return f"({len(x)} items)"
    if isinstance(x, dict):
        return f"({len(x)} fields)"
    s = "-" if x is None else num(x) if isinstance(x, bool) else str(x)
    s = s.replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= 120 else s[:117] + "..."


def table(head: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(x if isinstance(x, str) else cell(x) for x in r) + " |" for r in rows]
    return "\n".join(out)


def targets(data: dict) -> list[str]:
    t = data.get("targets_met")
    if not isinstance(t, dict) or not t:
        return []
    return [table(["target", "met"], [[k, "met" if v else "**not met**"] for k, v in t.items()])]


def mib(b) -> str:
    return num(b / 2**20, ".0f") if isinstance(b, (int, float)) else "-"


# ---------------------------------------------------------------------------------------------------
# which family, and where it ran

def family_of(path: Path, data: dict) -> tuple[str, str | None]:
    """(kind, variant) of a results file: its own `kind` / `variant`, else from its file name."""
    if isinstance(data.get("kind"), str) and data["kind"]:
        return data["kind"], data.get("variant") or None
    stem = path.stem
    m = LEGACY_MACHINE.search(stem) or MACHINE_ID.search(stem)
    if m:
        stem = stem[:m.start()]
    for kind in sorted(RENDERERS, key=len, reverse=True):
        if stem == kind or stem.startswith(kind + "-"):
            return kind, stem[len(kind) + 1:] or None
    return stem, None


def stamp(data: dict) -> str:
    m = data.get("machine") if isinstance(data.get("machine"), dict) else {}

    def f(v):
        return f"`{v}`" if v not in (None, "") else NR
    commit = f(data.get("commit"))
    if data.get("dirty"):
        commit += " (with uncommitted changes)"
    cores = m.get("cores")
    parts = [f"CPU {f(m.get('cpu'))}", f"class {f(m.get('cpu_class'))}",
             f"{cores} cores" if cores is not None else f"cores {NR}", f"date {f(data.get('date'))}",
             f"commit {commit}", f"patch hash {f(data.get('patch_hash'))}",
             f"llama.cpp {f(data.get('llama_cpp_commit'))}"]
    if m.get("id"):
        parts.append(f"machine id `{m['id']}`")
    if data.get("quick"):
        parts.append("**quick run**")
    return "Ran on: " + " · ".join(parts)


# ---------------------------------------------------------------------------------------------------
# the generic renderer: any family

def _scalar(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _records(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _table_of_dicts(v) -> bool:
    return isinstance(v, dict) and bool(v) and all(isinstance(x, dict) and all(_scalar(y) for y in x.values())
                                                    for x in v.values())


def _columns(dicts: list[dict], limit: int = 14) -> list[str]:
    cols: list[str] = []
    for d in dicts:
        for k, v in d.items():
            if k not in cols and (_scalar(v) or isinstance(v, list) and all(_scalar(x) for x in v)):
                cols.append(k)
    return cols[:limit]


def generic(data: dict, skip: tuple[str, ...] = PROVENANCE, max_rows: int = 40) -> list[str]:
    """A readable view of any results JSON: its scalar fields, every list of records as a table, every
    {name: {field: value}} as a table (rows: names), lists of values on one line; deeper nesting is
    named, not expanded."""
    blocks, scalars, nested = [], [], []
    for k, v in data.items():
        if k in skip:
            continue
        if _scalar(v):
            scalars.append([f"`{k}`", cell(v)])
        elif _table_of_dicts(v):
            cols: list[str] = []
            for x in v.values():
                cols += [c for c in x if c not in cols]
            counts = "total" not in cols and all(isinstance(x.get(c, 0), (int, float)) and not isinstance(x.get(c, 0), bool)
                                                 for x in v.values() for c in cols)
            rows = [[f"`{name}`", *(x.get(c, 0 if counts else None) for c in cols)] for name, x in list(v.items())[:max_rows]]
            if counts:         # {name: {outcome: count}}: a missing outcome is 0, and each row gets its total
                cols, rows = [*cols, "total"], [[*r, sum(r[1:])] for r in rows]
            blocks.append(f"`{k}`:\n\n" + table([k, *cols], rows)
                          + (f"\n\n({len(v) - max_rows} more in the JSON)" if len(v) > max_rows else ""))
        elif isinstance(v, dict) and all(_scalar(x) for x in v.values()):
            blocks.append(f"`{k}`:\n\n" + table(["field", "value"], [[f"`{a}`", cell(b)] for a, b in v.items()]))
        elif _records(v):
            cols = _columns(v)
            rows = [[x.get(c) for c in cols] for x in v[:max_rows]]
            blocks.append(f"`{k}` ({len(v)}):\n\n" + table(cols, rows)
                          + (f"\n\n({len(v) - max_rows} more in the JSON)" if len(v) > max_rows else ""))
        elif isinstance(v, list) and all(_scalar(x) for x in v):
            shown = ", ".join(cell(x) for x in v[:max_rows])
            scalars.append([f"`{k}`", shown + (f" ... ({len(v)} in all)" if len(v) > max_rows else "")])
        else:
            nested.append(f"`{k}` ({len(v)} entries)")
    out = [table(["field", "value"], scalars)] if scalars else []
    out += blocks
    if nested:
        out.append("Nested, in the JSON only: " + ", ".join(nested) + ".")
    return out


