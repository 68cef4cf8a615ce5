"""`lexi-gguf trace import`: routing traces written by other tools (CSV, one row per token and MoE layer)
into the trace format of lexi_gguf.runtime.trace (docs/caching.md), so the predictors and the cache
simulator run on any model's routing, not only on what this runtime recorded.

Columns (names are options): a token position, a layer, and the layer's expert ids, either in one cell
separated by spaces, `;`, `,` or `|` (`experts`), or one id a column (`--experts-col 'expert_*'`, a glob).
Optional: routing weights (same shape), the token id, a sequence (prompt) index. Every token must list
every layer once, each layer the same number of experts on every row (its k), ids in 0..n_expert-1.
"""
from __future__ import annotations

import csv
import fnmatch
import re
from pathlib import Path

import numpy as np

from .. import LexiError
from ..runtime.trace import Trace

_SPLIT = re.compile(r"[\s;,|]+")
NO_SIZES = "none"
SIZES_FIX = ("give them when importing: `lexi-gguf trace import CSV ... --like NAME [--quant Q]` (a released "
             "shape), `--expert-bytes N`, or `--model MODEL.gguf`")


def expert_sizes(n_layers: int, n_expert: int, *, model: str | Path | None = None, like: str | None = None,
                 quant: str | None = None, expert_bytes: int | None = None) -> tuple[list[float] | None, str]:
    """Bytes of one expert (gate + up + down) in each of a trace's n_layers MoE layers, and where they come
    from: the GGUF the routing is from, a released shape at a quant mix (testbeds.shapes), or one number for
    every layer. (None, "none") when none is given."""
    given = [x is not None for x in (model, like, expert_bytes)]
    if sum(given) > 1:
        raise LexiError("give one of --model GGUF, --like NAME or --expert-bytes N for the experts' sizes")
    if quant is not None and like is None:
        raise LexiError("--quant goes with --like NAME (the released shape's experts at that quant mix)")
    if expert_bytes is not None:
        if expert_bytes < 1:
            raise LexiError(f"--expert-bytes {expert_bytes}: give the bytes of one expert (gate + up + down), >= 1")
        return [float(expert_bytes)] * n_layers, f"given: {expert_bytes} bytes"
    if model is not None:
        from ..gguf.reader import footprint
        fp = footprint(model)
        sizes, where = [fp["expert_bytes"][i] for i in fp["info"].moe_layers], f"model: {Path(model).name}"
        n_exp = fp["info"].expert_count
    elif like is not None:
        from ..testbeds import shapes
        shape, quant = shapes.get(like), quant or "Q4_K_M"
        sizes, where, n_exp = shapes.expert_bytes(shape, quant), f"like: {like} {quant}", shape.experts
    else:
        return None, NO_SIZES
    if len(sizes) != n_layers or n_exp != n_expert:
        raise LexiError(f"the trace has {n_layers} MoE layers x {n_expert} experts, {where} {len(sizes)} x {n_exp}; "
                        "give the model the routing is from (or --expert-bytes N)")
    return sizes, where


def has_sizes(meta: dict) -> bool:
    """Whether a trace's meta gives real expert sizes (imports before sizes were marked wrote 1 byte each)."""
    b = meta.get("expert_bytes")
    if not b or meta.get("expert_bytes_from") == NO_SIZES:
        return False
    return not (str(meta.get("source", "")).startswith("csv:") and "expert_bytes_from" not in meta
                and all(x == 1.0 for x in b))


def _ids(cell: str, what: str, where: str, cast=int) -> list:
    parts = [p for p in _SPLIT.split(cell.strip()) if p]
    try:
        return [cast(p) for p in parts]
    except ValueError:
        raise LexiError(f"{where}: {what} {cell!r} is not a list of numbers") from None


def import_csv(path: str | Path, *, n_expert: int, token_col: str = "token", layer_col: str = "layer",
               experts_col: str = "experts", weights_col: str | None = None, token_id_col: str | None = None,
               seq_col: str | None = None, expert_bytes: list[float] | None = None,
               expert_bytes_from: str | None = None) -> Trace:
    """A Trace of the CSV's routing. expert_bytes: each MoE layer's bytes per expert (expert_sizes), or None:
    the trace then carries no sizes (meta expert_bytes None), and cache-sim --clock refuses it."""
    p = Path(path)
    if not p.exists():
        raise LexiError(f"{p} does not exist")
    if n_expert < 1:
        raise LexiError(f"--n-expert must be at least 1, got {n_expert}")
    with open(p, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        glob = any(c in experts_col for c in "*?[")
        e_cols = sorted(fnmatch.filter(header, experts_col), key=_natural) if glob else [experts_col]
        w_cols = (sorted(fnmatch.filter(header, weights_col), key=_natural) if weights_col and glob
                  else [weights_col] if weights_col else [])
        need = [token_col, layer_col, *e_cols, *w_cols, *(c for c in (token_id_col, seq_col) if c)]
        missing = [c for c in need if c not in header] or ([] if e_cols else [experts_col])
        if missing:
            raise LexiError(f"{p.name}: no column {', '.join(map(repr, missing))}; the header has "
                            f"{', '.join(header) or 'nothing'} (name the columns with --token-col, --layer-col, "
                            "--experts-col, ...)")
        rows: dict[tuple[int, int], tuple[list[int], list[float] | None]] = {}
        order: dict[int, tuple[int, int]] = {}        # token position -> (token id, seq)
        k_of: dict[int, tuple[int, int]] = {}         # layer -> (k, first line)
        for n, row in enumerate(reader, start=2):
            where = f"{p.name} line {n}"
            try:
                tok, layer = int(row[token_col]), int(row[layer_col])
            except (TypeError, ValueError):
                raise LexiError(f"{where}: {token_col!r} and {layer_col!r} must be integers, got "
                                f"{row.get(token_col)!r}, {row.get(layer_col)!r}") from None
            ids = [i for c in e_cols for i in _ids(row[c] or "", "experts", where)]
            ws = [w for c in w_cols for w in _ids(row[c] or "", "weights", where, float)] if w_cols else None
            bad = [i for i in ids if not 0 <= i < n_expert]
            if bad:
                raise LexiError(f"{where}: expert id {bad[0]} is out of range 0..{n_expert - 1} (--n-expert {n_expert})")
            if not ids or len(set(ids)) != len(ids):
                raise LexiError(f"{where}: layer {layer} lists {'no experts' if not ids else 'an expert twice'}: {ids}")
            if ws is not None and len(ws) != len(ids):
                raise LexiError(f"{where}: {len(ws)} weights for {len(ids)} experts")
            k0, line0 = k_of.setdefault(layer, (len(ids), n))
            if len(ids) != k0:
                raise LexiError(f"{where}: layer {layer} has {len(ids)} experts, {k0} on line {line0} (ragged rows; "
                                "a layer runs the same k for every token)")
            if (tok, layer) in rows:
                raise LexiError(f"{where}: token {tok} layer {layer} appears twice")
            rows[(tok, layer)] = (ids, ws)
            order.setdefault(tok, (int(row[token_id_col]) if token_id_col else -1,
                                   int(row[seq_col]) if seq_col else 0))
    if not rows:
        raise LexiError(f"{p.name} has no data rows")
    layers = sorted(k_of)
    tokens = list(order)
    for t in tokens:
        lacking = [layer for layer in layers if (t, layer) not in rows]
        if lacking:
            raise LexiError(f"{p.name}: token {t} has no row for layer(s) {lacking} (every token needs every layer)")
    counts = np.array([k_of[layer][0] for layer in layers], np.int32)
    kmax = int(counts.max())
    experts = np.full((len(tokens), len(layers), kmax), -1, np.int16)
    weights = np.zeros((len(tokens), len(layers), kmax), np.float32)
    for ti, t in enumerate(tokens):
        for li, layer in enumerate(layers):
            ids, ws = rows[(t, layer)]
            experts[ti, li, :len(ids)] = ids
            weights[ti, li, :len(ids)] = ws if ws is not None else 1.0 / len(ids)
    meta = {"model": None, "source": f"csv:{p.name}", "arch": None, "n_expert": int(n_expert),
            "k_base": kmax, "budget": "imported", "expert_bytes": list(expert_bytes) if expert_bytes else None,
            "expert_bytes_from": expert_bytes_from if expert_bytes else NO_SIZES,
            "weights_given": bool(w_cols), "seconds": 0.0, "callback_seconds": 0.0}
    ids_seq = np.array([order[t] for t in tokens], np.int32).reshape(-1, 2)
    return Trace(ids_seq[:, 0].copy(), np.zeros(len(tokens), bool), ids_seq[:, 1].copy(), np.array(layers, np.int32),
                 counts, experts, weights, None, meta)


def _natural(name: str):
    """expert_2 before expert_10."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]
