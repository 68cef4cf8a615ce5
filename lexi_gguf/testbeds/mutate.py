"""Damaged copies of a sound GGUF, for the mutation campaign (bench/mutations.py runs them through the
commands users run: tests/test_mutations.py, bench/bench_mutations.py).

Two families of cases:
- header: the file's bytes changed where its header says something (check.scan's layout): byte flips,
  truncations in every region, absurd counts, lengths, dimensions and offsets, unknown value and ggml
  types, another architecture's name, a bad magic or version;
- lexi: the file rewritten by gguf-py with lexi keys that break the contract (k above the expert count,
  k 0 on an MoE layer, arrays of the wrong length or type, ragged or too-wide ladders, an out-of-range
  budget index, a non-u32 base count, an unknown weight norm, a damaged sensitivity table or expert order).

Header cases are byte patches applied to a copy (materialize); lexi cases are files written here."""
from __future__ import annotations

import random
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..gguf import keys
from ..gguf.check import scan

@dataclass
class Case:
    id: str
    family: str          # header | lexi
    kind: str            # flip, truncate, count, strlen, type, dims, ggml_type, offset, arch, ... | the lexi key's fault
    detail: str
    patch: list = field(default_factory=list)   # header: [(offset, bytes)], truncate: [("truncate", size)]
    file: str | None = None                     # lexi: the rewritten file


# ---- building the cases -----------------------------------------------------------------------------

def header_cases(src: Path, rng: random.Random, n_flips: int) -> list[Case]:
    lay = scan(src, regions=True)
    regs = [r for r in lay.regions if r.offset < lay.data_start]
    size = lay.file_size
    out: list[Case] = []

    def add(kind, detail, patch):
        out.append(Case(f"{kind}-{len(out)}", "header", kind, detail, patch))

    def put(r, fmt, v):
        return [(r.offset, struct.pack("<" + fmt, v))]
    for _ in range(n_flips):
        r = rng.choice(regs)
        at = r.offset + rng.randrange(r.size)
        with open(src, "rb") as f:
            f.seek(at)
            b = f.read(1)[0]
        add("flip", f"byte {at} ({r.what}) xor", [(at, bytes([b ^ rng.randrange(1, 256)]))])
    kv_regs = [r for r in regs if r.what.startswith("key")]
    ti_regs = [r for r in regs if r.what.startswith("tensor")]
    cuts = {"inside the magic": 2, "inside the version": 6, "inside the counts": 12,
            "inside the key/values": kv_regs[len(kv_regs) // 2].offset + 1,
            "at the first tensor info": ti_regs[0].offset, "inside the tensor infos": ti_regs[len(ti_regs) // 2].offset + 1,
            "before the data": lay.data_start - 1, "at the data": lay.data_start,
            "inside the first tensor": lay.tensors[0].offset + max(1, lay.tensors[0].nbytes // 2),
            "one byte short": size - 1}
    for where, at in cuts.items():
        add("truncate", where, [("truncate", at)])
    add("truncate", "empty file", [("truncate", 0)])
    add("magic", "GGUL", [(0, b"GGUL")])
    for v in (1, 4, 0xFFFFFFFF):
        add("version", f"version {v}", [(4, struct.pack("<I", v))])
    counts = [r for r in regs if r.kind == "count"]
    for r in counts[:2] + rng.sample(counts[2:], min(6, len(counts) - 2)):
        for v in ((1 << 63) - 1, 1 << 32):
            add("count", f"{r.what} = {v}", put(r, "Q", v))
    strl = [r for r in regs if r.kind == "strlen"]
    for r in rng.sample(strl, min(8, len(strl))):
        for v in (1 << 62, size):
            add("strlen", f"{r.what} = {v}", put(r, "Q", v))
    types = [r for r in regs if r.kind == "type"]
    for r in rng.sample(types, min(8, len(types))):
        for v in (99, 9):
            add("type", f"{r.what} = {v}", put(r, "I", v))
    dims = [r for r in regs if r.kind == "dims"]
    for r in rng.sample(dims, min(8, len(dims))):
        if r.size == 4:
            for v in (0, 5, 1 << 31):
                add("dims", f"{r.what} = {v}", put(r, "I", v))
        else:
            for v in (1 << 40, 0, 3, (1 << 63) + 5):
                add("dims", f"{r.what} = {v}", put(r, "Q", v))
    gts = [r for r in regs if r.kind == "ggml_type"]
    for r in rng.sample(gts, min(6, len(gts))):
        for v in (99, 1 << 31, 0, 8):        # unknown, absurd, F32, Q8_0 (sizes no longer add up)
            add("ggml_type", f"{r.what} = {v}", put(r, "I", v))
    offs = [r for r in regs if r.kind == "offset"]
    for r in rng.sample(offs, min(6, len(offs))):
        with open(src, "rb") as f:
            f.seek(r.offset)
            (v0,) = struct.unpack("<Q", f.read(8))
        for v in (v0 + 1, 1 << 60, v0 + lay.alignment):
            add("offset", f"{r.what} = {v}", put(r, "Q", v))
    arch = lay.kv["general.architecture"][1]
    at = next(r for r in regs if r.what == "key 'general.architecture': value" and r.kind == "text").offset
    others = ("qwen2", "gemma", "llama", "grok", "bert", "mamba", "phi3", "zzzzz", "qwen3moe", "deepseek2")
    for other in (o for o in others if len(o) == len(arch) and o != arch):
        add("arch", f"general.architecture {arch!r} -> {other!r}", [(at, other.encode())])
    return out


def _lexi_fields(src: Path) -> dict:
    """The lexi keys of src as copy_with_metadata's `new` entries (value, type, sub-type)."""
    from ..gguf.reader import gguf_py, open_reader
    gguf = gguf_py()
    r = open_reader(src)
    out = {}
    for f in r.fields.values():
        if f.name.startswith("lexi."):
            vt = f.types[0]
            out[f.name] = (f.contents(), vt, f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    return out


def lexi_cases(src: Path, work: Path) -> list[Case]:
    """Files whose lexi keys break the contract, written by gguf-py (copy_with_metadata)."""
    from ..gguf.reader import gguf_py, model_info
    from ..gguf.writer import copy_with_metadata
    T = gguf_py().GGUFValueType
    info = model_info(src)
    base = _lexi_fields(src)
    n, e, moe = info.block_count, info.expert_count, info.moe_layers
    row = [int(x) for x in base[keys.EXPERT_USED_COUNT][0]]
    m = moe[0]
    ladder = [int(x) for x in base[keys.LADDER_EXPERT_USED_COUNT][0]] if keys.LADDER_EXPERT_USED_COUNT in base else row
    U32A = (T.ARRAY, T.UINT32)

    def arr(v, t=U32A):
        return (list(v), t[0], t[1])

    def with_k(i, k):
        r = list(row)
        r[i] = k
        return r
    muts = {
        "k-above-expert-count": {keys.EXPERT_USED_COUNT: arr(with_k(m, e + 1))},
        "k-huge": {keys.EXPERT_USED_COUNT: arr(with_k(m, 0xFFFFFFFF))},
        "k-zero-on-moe": {keys.EXPERT_USED_COUNT: arr(with_k(m, 0))},
        "k-negative-i32": {keys.EXPERT_USED_COUNT: arr(with_k(m, -1), (T.ARRAY, T.INT32))},
        "counts-one-short": {keys.EXPERT_USED_COUNT: arr(row[:-1])},
        "counts-one-long": {keys.EXPERT_USED_COUNT: arr(row + [row[-1]])},
        "counts-as-u8": {keys.EXPERT_USED_COUNT: arr(row, (T.ARRAY, T.UINT8))},
        "counts-as-string": {keys.EXPERT_USED_COUNT: (",".join(map(str, row)), T.STRING, None)},
        "counts-as-f32": {keys.EXPERT_USED_COUNT: arr([float(x) for x in row], (T.ARRAY, T.FLOAT32))},
        "counts-as-scalar": {keys.EXPERT_USED_COUNT: (row[m], T.UINT32, None)},
        "ladder-ragged": {keys.LADDER_EXPERT_USED_COUNT: arr(ladder + ladder[:max(1, n // 2)])},
        "ladder-too-wide": {keys.LADDER_BUDGETS: arr([1.0] * (len(ladder) // n + 2), (T.ARRAY, T.FLOAT32))},
        "ladder-totals-short": {keys.LADDER_TOTALS: arr([1])},
        "ladder-row-k-zero": {keys.LADDER_EXPERT_USED_COUNT: arr([0 if i == m else k for i, k in enumerate(ladder)])},
        "ladder-row-k-above": {keys.LADDER_EXPERT_USED_COUNT: arr([e + 3 if i == m else k for i, k in enumerate(ladder)])},
        "budget-index-out-of-range": {keys.BUDGET_INDEX: (1000, T.UINT32, None)},
        "budget-index-as-string": {keys.BUDGET_INDEX: ("0", T.STRING, None)},
        "base-count-as-string": {keys.BASE_EXPERT_USED_COUNT: (str(info.expert_used_count), T.STRING, None)},
        "base-count-as-f32": {keys.BASE_EXPERT_USED_COUNT: (float(info.expert_used_count), T.FLOAT32, None)},
        "base-count-wrong": {keys.BASE_EXPERT_USED_COUNT: (info.expert_used_count + 1, T.UINT32, None)},
        "enable-as-u32": {keys.ENABLE: (1, T.UINT32, None)},
        "weight-norm-unknown": {keys.WEIGHT_NORM: ("bogus", T.STRING, None)},
        "weight-norm-as-u32": {keys.WEIGHT_NORM: (1, T.UINT32, None)},
        "sensitivity-one-short": {keys.SENS_DEVIATION: arr([0.5] * (n * info.expert_used_count - 1), (T.ARRAY, T.FLOAT32))},
        "sensitivity-as-u32": {keys.SENS_DEVIATION: arr([1] * (n * info.expert_used_count))},
        "expert-order-not-a-permutation": {keys.EXPERT_ORDER: arr([0] * (n * e))},
        "expert-order-short": {keys.EXPERT_ORDER: arr(list(range(e)) * (n - 1))},
    }
    if len(moe) < n:       # a dense block: a count there
        d = next(i for i in range(n) if i not in moe)
        muts["k-on-dense-block"] = {keys.EXPERT_USED_COUNT: arr(with_k(d, 1))}
    out = []
    for name, change in muts.items():
        path = work / f"lexi-{name}.gguf"
        if not path.exists():
            copy_with_metadata(src, path, {**base, **change}, force=True, progress=False)
        out.append(Case(f"lexi-{name}", "lexi", name, ", ".join(change), file=str(path)))
    return out


def materialize(case: Case, src: Path, dst: Path) -> Path:
    if case.family == "lexi":
        return Path(case.file)
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        for at, data in case.patch:
            if at == "truncate":
                f.truncate(data)
            else:
                f.seek(at)
                f.write(data)
    return dst
