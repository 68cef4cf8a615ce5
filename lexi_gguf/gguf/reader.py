"""Reading GGUF files: model facts (architecture, blocks, experts, MoE layers, tensor types) and the
lexi keys a file stores (counts, ladder, sensitivity table). Key names come from lexi_gguf.gguf.keys;
the writer (lexi_gguf.gguf.writer) is separate, as in gguf-py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import LexiError
from . import keys
from .check import check, gguf_py  # noqa: F401  (gguf_py: imported from here by the other stages)


_READER = None


def _reader_class():
    """gguf-py's GGUFReader with a fast path for array fields. Stock, it makes one numpy view per element
    (two per string), so a 150k-token vocabulary takes ~7 s to open on every call; here a numeric array is
    one view and a string is two memoryview slices, which give the same contents() (measured 10-20x faster on the shipped vocabularies)."""
    global _READER
    if _READER is not None:
        return _READER
    import struct

    gguf = gguf_py()
    from gguf.gguf_reader import GGUF_MAX_ARRAY_ELEMENTS, GGUF_MAX_STRING_LENGTH
    T = gguf.GGUFValueType

    class Reader(gguf.GGUFReader):
        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type != T.ARRAY or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            n, sub = int(alen[0]), T(int(itype[0]))
            scalar = self.gguf_scalar_to_np.get(sub)
            if n == 0 or n > GGUF_MAX_ARRAY_ELEMENTS or (sub != T.STRING and scalar is None):
                return super()._get_field_parts(orig_offs, raw_type)    # empty, invalid or nested: as stock
            offs, parts = orig_offs + 12, [itype, alen]
            if scalar is not None:
                arr = self._get(offs, scalar, n)
                if len(arr) != n:
                    raise ValueError(f"array field at offset {orig_offs} runs past the end of the file")
                return 12 + int(arr.nbytes), [*parts, arr], [2], [T.ARRAY, sub]
            mv = getattr(self, "_mv", None) or memoryview(self.data)
            self._mv = mv
            for _ in range(n):
                (size,) = struct.unpack_from("=Q", mv, offs)
                if size > GGUF_MAX_STRING_LENGTH or offs + 8 + size > len(mv):
                    raise ValueError(f"string at offset {offs} runs past the end of the file")
                parts += (mv[offs:offs + 8], mv[offs + 8:offs + 8 + size])
                offs += 8 + size
            return offs - orig_offs, parts, list(range(3, 2 + 2 * n, 2)), [T.ARRAY, T.STRING]

    _READER = Reader
    return Reader


def open_one(path: str | Path):
    """One GGUF file (one shard of a split set)."""
    path = Path(path)
    if not path.exists():
        raise LexiError(f"{path} does not exist")
    if path.is_dir():
        raise LexiError(f"{path} is a folder; give a .gguf file (a Hugging Face folder goes to `lexi-gguf convert`)")
    check(path)      # a malformed file: MalformedGGUF, naming the byte offset and the field
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, _reader_class())
    if key in _opened:       # a command opens its file several times (info, footprint, load): parse it once
        return _opened[key]
    try:
        r = _reader_class()(path, "r")
    except Exception as e:    # the structure is valid, yet gguf-py (or our fast path) fails: not the user's file
        raise LexiError(f"lexi-gguf could not read {path}, although its GGUF structure is valid ({type(e).__name__}: "
                        f"{e}): this is a lexi-gguf bug, please report it with the file's origin") from e
    if len(_opened) >= 8:       # the shards of a set, a source and its output: a few at a time
        _opened.pop(next(iter(_opened)))
    _opened[key] = r
    return r


_opened: dict[tuple, object] = {}


def open_reader(path: str | Path):
    """A GGUF, or a split set given its first shard (split.ShardedReader: all shards' tensors)."""
    from .split import open_set
    path = Path(path)
    return open_set(path, open_one(path), open_one)


def shard_paths(reader, path: str | Path) -> list[Path]:
    """The files a reader covers: the shards of a split set, else the one file."""
    return list(getattr(reader, "paths", [Path(path)]))


def set_files(path: str | Path) -> list[Path]:
    """The files of the GGUF at `path`: every shard of a split set given its first, else [path]."""
    return shard_paths(open_reader(path), path)


def field_value(reader, name: str):
    f = reader.fields.get(name)
    if f is None:
        return None
    v = f.contents()
    return v


@dataclass
class GGUFModelInfo:
    path: Path
    arch: str
    block_count: int
    expert_count: int
    expert_used_count: int
    moe_layers: list[int]
    tensor_types: dict[str, str] = field(default_factory=dict)
    lexi: dict = field(default_factory=dict)
    nextn_blocks: int = 0    # NextN/MTP blocks after the main layers (GLM-4.5, Qwen3.5): never in the main graph
    shards: list[Path] = field(default_factory=list)   # a split set's files, first shard first; [path] if not split
    lexi_types: dict = field(default_factory=dict)     # lexi key -> its GGUF value type names, e.g. ("ARRAY", "UINT32")

    @property
    def n_main(self) -> int:
        """Blocks the main graph runs (the checkpoint's layers)."""
        return self.block_count - self.nextn_blocks

    @property
    def base_counts(self) -> list[int]:
        """The model's own k per block (0 on dense blocks): what runs with lexi off."""
        return [self.expert_used_count if i in self.moe_layers else 0 for i in range(self.block_count)]

    @property
    def is_moe(self) -> bool:
        return self.expert_count > 0 and bool(self.moe_layers)


def model_info(path: str | Path, reader=None, check_lexi: bool = True) -> GGUFModelInfo:
    """The model facts of a GGUF (or split set). check_lexi: refuse a file whose lexi keys break the
    contract (lexi_problem), as the patched loader would; apply, which replaces them, reads it anyway."""
    r = reader or open_reader(path)
    arch = field_value(r, "general.architecture")
    if arch is None:
        raise LexiError(f"{path} has no general.architecture; it is not a llama.cpp model GGUF")
    if not isinstance(arch, str):
        raise LexiError(f"{path}: general.architecture is {arch!r:.40}, not a string; the file's metadata is damaged: "
                        "re-download or re-convert it")
    for name in (keys.arch_block_count(arch), keys.arch_expert_count(arch)):
        v = field_value(r, name)
        if v is not None and (isinstance(v, (list, str, bool, float, np.floating)) or not 0 <= int(v) < 1 << 16):
            raise LexiError(f"{path}: {name} = {v!r:.40} is not a count of sane size; the file's metadata is damaged: "
                            "re-download or re-convert it")
    blocks = field_value(r, keys.arch_block_count(arch))
    if blocks is None:
        raise LexiError(f"{path} has no {keys.arch_block_count(arch)}; it is not a llama.cpp model GGUF")
    n_exp = field_value(r, keys.arch_expert_count(arch)) or 0
    k = field_value(r, keys.arch_expert_used_count(arch)) or 0
    if isinstance(k, list):  # a per-layer standard key: take the largest as the model's own k
        k = max(k, default=0)
    if isinstance(k, (str, float, np.floating)) or not 0 <= int(k) <= max(int(n_exp), 0):
        raise LexiError(f"{path}: {keys.arch_expert_used_count(arch)} = {k!r:.40} is not a count within "
                        f"{keys.arch_expert_count(arch)} = {n_exp}; the file's metadata is damaged: re-download or re-convert it")
    names = {t.name: t.tensor_type.name for t in r.tensors}
    moe = [i for i in range(blocks) if f"blk.{i}.ffn_gate_inp.weight" in names]
    lexi = {f.name: f.contents() for f in r.fields.values() if f.name.startswith("lexi.")}
    nextn = int(field_value(r, f"{arch}.nextn_predict_layers") or 0)
    types = {f.name: tuple(T.name for T in f.types) for f in r.fields.values() if f.name.startswith("lexi.")}
    info = GGUFModelInfo(Path(path), arch, int(blocks), int(n_exp), int(k), moe, names, lexi, nextn,
                         shard_paths(r, path), types)
    if check_lexi and (problem := lexi_problem(info)):
        raise LexiError(f"{Path(path).name}: {problem}; the file's lexi keys are damaged: write new ones with "
                        f"`lexi-gguf apply {Path(path).name} -o NEW.gguf --budget 0.75` (or --k)")
    return info


def lexi_problem(info: GGUFModelInfo) -> str | None:
    """What breaks the lexi contract (docs/gguf-contract.md) in a file's lexi keys, or None: the checks
    the patched loader makes, and those of the keys only lexi-gguf reads (ladder, sensitivity table,
    expert order), so no command reads a damaged key as if it were sound."""
    lx, t, n = info.lexi, info.lexi_types, info.block_count
    U32 = ("UINT32",)
    counts = ("ARRAY", "UINT32"), ("ARRAY", "INT32")

    def typed(key, *want) -> str | None:
        if key in lx and t.get(key) not in want:
            return f"{key} is {'/'.join(t.get(key, ('?',)))}, must be {' or '.join('/'.join(w) for w in want)}"
        return None

    def row_problem(key, row: list[int]) -> str | None:
        for i, k in enumerate(row):
            moe, nextn = i in info.moe_layers, i >= info.n_main
            if not 0 <= k <= info.expert_count:
                return f"{key}[{i}] = {k} is out of range 0..{info.expert_count} (expert_count)"
            if moe and k == 0:
                return f"{key}[{i}] = 0 but block {i} is an MoE layer (use 1..{info.expert_count})"
            if not moe and k and not nextn:
                return f"{key}[{i}] = {k} but block {i} is dense (use 0)"
        return None
    for key, want in ((keys.ENABLE, [("BOOL",)]), (keys.BUDGET_INDEX, [U32]), (keys.BASE_EXPERT_USED_COUNT, [U32]),
                      (keys.WEIGHT_NORM, [("STRING",)]), (keys.EXPERT_USED_COUNT, counts),
                      (keys.LADDER_EXPERT_USED_COUNT, counts), (keys.LADDER_BUDGETS, [("ARRAY", "FLOAT32")]),
                      (keys.LADDER_TOTALS, [("ARRAY", "UINT32")]), (keys.SENS_DEVIATION, [("ARRAY", "FLOAT32")]),
                      (keys.SENS_STDERR, [("ARRAY", "FLOAT32")]), (keys.EXPERT_ORDER, [("ARRAY", "UINT32")])):
        if problem := typed(key, *want):
            return problem
    if lx and not info.is_moe:
        return f"the file has lexi keys but {info.arch} here has no MoE layers"
    if keys.WEIGHT_NORM in lx and lx[keys.WEIGHT_NORM] not in keys.WEIGHT_NORMS:
        return f"{keys.WEIGHT_NORM} = {lx[keys.WEIGHT_NORM]!r:.40} is not {' or '.join(keys.WEIGHT_NORMS)}"
    kb = int(lx.get(keys.BASE_EXPERT_USED_COUNT, info.expert_used_count))
    if keys.BASE_EXPERT_USED_COUNT in lx and kb != info.expert_used_count:
        return f"{keys.BASE_EXPERT_USED_COUNT} = {kb}, but the model's own k is {info.expert_used_count}"
    if keys.EXPERT_USED_COUNT in lx:
        row = [int(x) for x in lx[keys.EXPERT_USED_COUNT]]
        if len(row) != n:
            return f"{keys.EXPERT_USED_COUNT} has {len(row)} entries, expected {n} (block_count)"
        if problem := row_problem(keys.EXPERT_USED_COUNT, row):
            return problem
    rows = 0
    if keys.LADDER_EXPERT_USED_COUNT in lx:
        flat = [int(x) for x in lx[keys.LADDER_EXPERT_USED_COUNT]]
        if not flat or len(flat) % n:
            return f"{keys.LADDER_EXPERT_USED_COUNT} has {len(flat)} entries, expected a multiple of {n} (block_count)"
        rows = len(flat) // n
        for j in range(rows):
            if problem := row_problem(f"{keys.LADDER_EXPERT_USED_COUNT} row {j}:", flat[j * n:(j + 1) * n]):
                return problem
    for key in (keys.LADDER_BUDGETS, keys.LADDER_TOTALS):
        if key in lx and len(lx[key]) != rows:
            return f"{key} has {len(lx[key])} entries, but the ladder has {rows} rows"
    if keys.BUDGET_INDEX in lx and int(lx[keys.BUDGET_INDEX]) >= rows:
        return f"{keys.BUDGET_INDEX} = {lx[keys.BUDGET_INDEX]} is out of range: the file stores {rows} budgets"
    for key in (keys.SENS_DEVIATION, keys.SENS_STDERR):
        if key in lx and len(lx[key]) != n * kb:
            return f"{key} has {len(lx[key])} entries, expected {n * kb} (block_count x base k)"
    if keys.EXPERT_ORDER in lx:
        order = np.asarray(lx[keys.EXPERT_ORDER], dtype=np.int64)
        e = info.expert_count
        if order.size != n * e:
            return f"{keys.EXPERT_ORDER} has {order.size} entries, expected {n * e} (block_count x expert_count)"
        bad = [i for i, r in enumerate(order.reshape(n, e)) if sorted(r.tolist()) != list(range(e))]
        if bad:
            return f"{keys.EXPERT_ORDER} row {bad[0]} is not a permutation of 0..{e - 1}"
    return None


def validate_counts(info: GGUFModelInfo, counts: list[int], what: str = "--k") -> None:
    """The checks the patched loader makes, in Python, before anything is written."""
    if not info.is_moe:
        raise LexiError(f"{info.path.name} ({info.arch}) has no MoE layers: LExI has nothing to adapt")
    if len(counts) != info.block_count:
        raise LexiError(f"{what} has {len(counts)} entries but the model has {info.block_count} blocks "
                        f"(MoE blocks: {info.moe_layers}); give one k per block, 0 for dense blocks")
    for i, k in enumerate(counts):
        if i in info.moe_layers and not 1 <= k <= info.expert_count:
            raise LexiError(f"{what}[{i}] = {k}: block {i} is an MoE layer, k must be in 1..{info.expert_count}")
        if i not in info.moe_layers and k != 0:
            raise LexiError(f"{what}[{i}] = {k}: block {i} is dense, k must be 0")


def read_ladder(info: GGUFModelInfo) -> list[dict]:
    """The budgets stored in a file: index, budget fraction, total, per-layer k."""
    lx = info.lexi
    rows = []
    if keys.LADDER_EXPERT_USED_COUNT in lx:
        flat = list(lx[keys.LADDER_EXPERT_USED_COUNT])
        n = len(flat) // info.block_count
        budgets = list(lx.get(keys.LADDER_BUDGETS, [float("nan")] * n))
        totals = list(lx.get(keys.LADDER_TOTALS, [sum(flat[i * info.block_count:(i + 1) * info.block_count]) for i in range(n)]))
        for i in range(n):
            rows.append({"index": i, "budget": float(budgets[i]), "total": int(totals[i]),
                         "expert_used_count": [int(x) for x in flat[i * info.block_count:(i + 1) * info.block_count]]})
    return rows


def sensitivity_from_gguf(info: GGUFModelInfo) -> dict | None:
    """Rebuild the sensitivity dict stored in a file (so it can be re-budgeted without its weights)."""
    lx = info.lexi
    if keys.SENS_DEVIATION not in lx:
        return None
    kb = int(lx.get(keys.BASE_EXPERT_USED_COUNT, info.expert_used_count))
    dev = np.asarray(lx[keys.SENS_DEVIATION], dtype=np.float64).reshape(info.block_count, kb)
    se = np.asarray(lx.get(keys.SENS_STDERR, np.zeros(dev.size)), dtype=np.float64).reshape(info.block_count, kb)
    # trailing blocks the checkpoint did not carry (GLM's NextN block) were not profiled: all-zero rows.
    # Dropping trailing dense rows too changes nothing: extra blocks keep k_base if MoE, else 0.
    n = info.block_count
    while n > 1 and not dev[n - 1].any():
        n -= 1
    return {"arch": info.arch, "k_base": kb, "n_expert": info.expert_count, "n_layer": n,
            "settings": {"samples": int(lx.get(keys.SENS_SAMPLES, 0)), "seed": int(lx.get(keys.SENS_SEED, 0)),
                         "input": lx.get(keys.SENS_INPUT, "raw"),
                         # files written before the key: the table was profiled for the file's own mode
                         "weight_norm": lx.get(keys.SENS_WEIGHT_NORM, lx.get(keys.WEIGHT_NORM, "renorm"))},
            "layers": [{"index": i, "moe": i in info.moe_layers,
                        "deviation": dev[i].tolist() if i in info.moe_layers else None,
                        "stderr": se[i].tolist() if i in info.moe_layers else None} for i in range(n)]}


EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps")


def footprint(path: str | Path, reader=None) -> dict:
    """Bytes and parameters a token touches: everything but the expert tensors and the embedding table,
    one embedding row, plus k experts' share of each MoE layer."""
    r = reader or open_reader(path)
    info = model_info(path, r)
    fixed_b = fixed_p = 0
    per_expert_b = [0.0] * info.block_count
    per_expert_p = [0.0] * info.block_count
    for t in r.tensors:
        n_el, n_b = int(t.n_elements), int(t.n_bytes)
        parts = t.name.split(".")
        if t.name.startswith("token_embd"):
            rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
            fixed_b += n_b / rows
            fixed_p += n_el / rows
        elif len(parts) > 2 and parts[0] == "blk" and parts[2] in EXPERT_TENSORS:
            i = int(parts[1])
            per_expert_b[i] += n_b / info.expert_count
            per_expert_p[i] += n_el / info.expert_count
        else:
            fixed_b += n_b
            fixed_p += n_el
    return {"fixed_bytes": fixed_b, "fixed_params": fixed_p, "expert_bytes": per_expert_b,
            "expert_params": per_expert_p, "info": info}


def active(fp: dict, counts: list[int]) -> tuple[float, float]:
    """(bytes, params) active per token for per-layer counts."""
    b = fp["fixed_bytes"] + sum(k * e for k, e in zip(counts, fp["expert_bytes"]))
    p = fp["fixed_params"] + sum(k * e for k, e in zip(counts, fp["expert_params"]))
    return b, p
