"""GGUF reading (model facts, lexi keys) and the streaming, atomic copy that writes lexi keys.

Readers and writers are separate; key names come from lexi_gguf.keys.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import LexiError, __version__, keys


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LexiError("gguf-py is not installed; run `make setup` (it installs the pinned llama.cpp's gguf-py)") from None
    return gguf


def open_reader(path: str | Path):
    gguf = _gguf()
    path = Path(path)
    if not path.exists():
        raise LexiError(f"{path} does not exist")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:
        raise LexiError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                        "it is truncated or corrupt, re-download or re-convert it") from None


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

    @property
    def n_main(self) -> int:
        """Blocks the main graph runs (the checkpoint's layers)."""
        return self.block_count - self.nextn_blocks

    @property
    def is_moe(self) -> bool:
        return self.expert_count > 0 and bool(self.moe_layers)


def model_info(path: str | Path, reader=None) -> GGUFModelInfo:
    r = reader or open_reader(path)
    arch = field_value(r, "general.architecture")
    if arch is None:
        raise LexiError(f"{path} has no general.architecture; it is not a llama.cpp model GGUF")
    blocks = field_value(r, keys.arch_block_count(arch))
    if blocks is None:
        raise LexiError(f"{path} has no {keys.arch_block_count(arch)}; it is not a llama.cpp model GGUF")
    n_exp = field_value(r, keys.arch_expert_count(arch)) or 0
    k = field_value(r, keys.arch_expert_used_count(arch)) or 0
    if isinstance(k, list):  # a per-layer standard key: take the largest as the model's own k
        k = max(k)
    names = {t.name: t.tensor_type.name for t in r.tensors}
    moe = [i for i in range(blocks) if f"blk.{i}.ffn_gate_inp.weight" in names]
    lexi = {f.name: f.contents() for f in r.fields.values() if f.name.startswith("lexi.")}
    nextn = int(field_value(r, f"{arch}.nextn_predict_layers") or 0)
    return GGUFModelInfo(Path(path), arch, int(blocks), int(n_exp), int(k), moe, names, lexi, nextn)


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


@contextmanager
def atomic_output(out: str | Path, force: bool = False):
    """Yield a temp path beside `out`; rename it onto `out` only if the body succeeds."""
    out = Path(out)
    if out.exists() and not force:
        raise LexiError(f"{out} already exists; pass --force to overwrite it")
    if not out.parent.exists():
        raise LexiError(f"output folder {out.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, out)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise LexiError(f"writing {out} failed: {e.strerror or e}; nothing was written") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lexi_metadata(info: GGUFModelInfo, counts: list[int], method: str, *, sensitivity: dict | None = None,
                  ladder: list[dict] | None = None, weight_norm: str | None = None) -> dict:
    """Build the lexi key/value set (name -> (value, GGUFValueType, sub_type))."""
    gguf = _gguf()
    T = gguf.GGUFValueType
    n_moe = len(info.moe_layers)
    total = int(sum(counts))
    md = {
        keys.VERSION: (__version__, T.STRING, None),
        keys.EXPERT_USED_COUNT: ([int(k) for k in counts], T.ARRAY, T.UINT32),
        keys.BASE_EXPERT_USED_COUNT: (info.expert_used_count, T.UINT32, None),
        keys.METHOD: (method, T.STRING, None),
        keys.TOTAL: (total, T.UINT32, None),
        keys.BUDGET: (total / (n_moe * info.expert_used_count), T.FLOAT32, None),
    }
    if weight_norm and weight_norm != "renorm":     # renorm is the runtime's default: files stay as they were
        md[keys.WEIGHT_NORM] = (weight_norm, T.STRING, None)
    if ladder:
        rows = [r["expert_used_count"] for r in ladder]
        for r in rows:
            validate_counts(info, r, "ladder row")
        md[keys.LADDER_BUDGETS] = ([float(r["budget"]) for r in ladder], T.ARRAY, T.FLOAT32)
        md[keys.LADDER_TOTALS] = ([int(r["total"]) for r in ladder], T.ARRAY, T.UINT32)
        md[keys.LADDER_EXPERT_USED_COUNT] = ([int(k) for r in rows for k in r], T.ARRAY, T.UINT32)
    if sensitivity:
        kb = int(sensitivity["k_base"])
        dev, se = [], []
        for L in sensitivity["layers"]:
            dev += L["deviation"] if L["moe"] else [0.0] * kb
            se += (L.get("stderr") or [0.0] * kb) if L["moe"] else [0.0] * kb
        if len(dev) != info.block_count * kb:
            raise LexiError(f"the sensitivity table has {len(sensitivity['layers'])} layers but the model has "
                            f"{info.block_count} blocks; it was made for another model")
        st = sensitivity.get("settings", {})
        md[keys.SENS_DEVIATION] = ([float(x) for x in dev], T.ARRAY, T.FLOAT32)
        md[keys.SENS_STDERR] = ([float(x) for x in se], T.ARRAY, T.FLOAT32)
        md[keys.SENS_SAMPLES] = (int(st.get("samples", 0)), T.UINT32, None)
        md[keys.SENS_SEED] = (int(st.get("seed", 0)), T.UINT32, None)
        md[keys.SENS_INPUT] = (str(st.get("input", "raw")), T.STRING, None)
        md[keys.SENS_SOURCE] = (str(sensitivity.get("source", "safetensors")), T.STRING, None)
    return md


def copy_with_metadata(src: str | Path, out: str | Path, new: dict, *, force: bool = False,
                       drop_prefix: str = "lexi.", progress: bool = True) -> Path:
    """Stream src to out with `new` metadata (old lexi.* keys dropped). Tensors are copied one at a time
    from the reader's memory map, never the whole file in memory; the output appears atomically."""
    gguf = _gguf()
    reader = open_reader(src)
    arch = field_value(reader, "general.architecture")
    with atomic_output(out, force) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
        for f in reader.fields.values():
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF.") or f.name.startswith(drop_prefix):
                continue
            vt = f.types[0]
            sub = f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), vt, sub_type=sub)
        for name, (val, vt, sub) in new.items():
            writer.add_key_value(name, val, vt, sub_type=sub)
        total = 0
        for t in reader.tensors:
            total += int(t.n_bytes)
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(desc="write", total=total, unit="B", unit_scale=True)
        for t in reader.tensors:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
            if bar:
                bar.update(int(t.n_bytes))
        writer.close()
        if bar:
            bar.close()
        del reader
    return Path(out)


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
                         "input": lx.get(keys.SENS_INPUT, "raw")},
            "layers": [{"index": i, "moe": i in info.moe_layers,
                        "deviation": dev[i].tolist() if i in info.moe_layers else None,
                        "stderr": se[i].tolist() if i in info.moe_layers else None} for i in range(n)]}
