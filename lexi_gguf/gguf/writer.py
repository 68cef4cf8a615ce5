"""Writing GGUF files: the lexi key/value set and the streaming, atomic copy that writes it. Tensors
are streamed from the source's memory map; an output appears only when it is complete.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from .. import LexiError, __version__
from . import keys
from .check import scan
from .pages import release
from .verify import ReadBack, WriteCheckError, Written
from .reader import GGUFModelInfo, field_value, gguf_py, open_reader, validate_counts
from .split import link_or_copy, output_names


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
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)    # mkstemp's 0600 would make the model unreadable to other users
    try:
        yield Path(tmp)
        os.replace(tmp, out)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise LexiError(f"writing {out} failed: {e.strerror or e}; nothing was written") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def free_bytes(folder: Path) -> int:
    """Free bytes for this user on the file system holding `folder`."""
    import shutil
    return shutil.disk_usage(folder).free


def require_free(folder: str | Path, need: int, what: str) -> None:
    """Refuse before writing anything when `folder`'s file system cannot hold `need` bytes."""
    folder = Path(folder)
    have = free_bytes(folder)
    if have < need:
        raise LexiError(f"{what} needs {need / 2**20:,.1f} MiB free on the file system of {folder}, which has "
                        f"{have / 2**20:,.1f} MiB; free some space or write the output elsewhere (-o)")


def copy_space(shards: list[Path], out_dir: Path) -> int:
    """Bytes a copy of these shards into out_dir writes: the first shard, plus every other shard that
    cannot be hard-linked there (another file system)."""
    dev = out_dir.stat().st_dev
    return shards[0].stat().st_size + (1 << 20) + sum(p.stat().st_size for p in shards[1:] if p.stat().st_dev != dev)


def lexi_metadata(info: GGUFModelInfo, counts: list[int], method: str, *, sensitivity: dict | None = None,
                  ladder: list[dict] | None = None, weight_norm: str | None = None) -> dict:
    """Build the lexi key/value set (name -> (value, GGUFValueType, sub_type))."""
    gguf = gguf_py()
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
        md[keys.SENS_WEIGHT_NORM] = (str(st.get("weight_norm", "renorm")), T.STRING, None)
    return md


def copy_with_metadata(src: str | Path, out: str | Path, new: dict, *, force: bool = False,
                       drop_prefix: str = "lexi.", progress: bool = True, tensor_data=None,
                       same_shapes: bool = False, read_back: bool = True) -> Path:
    """Stream src to out with `new` metadata (old lexi.* keys dropped). Tensors are copied one at a time
    from the reader's memory map, never the whole file in memory; the output appears atomically.

    A split src (its first shard) gives a split output named by llama.cpp's pattern (split.output_names):
    a new first shard with the metadata and its tensors, the other shards hard-linked (or copied) as they
    are, or rewritten through `tensor_data` too when one is given (a transform of tensors applies to
    every shard). The other shards appear first, the first shard last, so a visible first shard means a
    whole set. same_shapes: tensor_data keeps every tensor's shape and type, so the header is written from
    the source's (an extra pass over all the data saved). read_back=False skips the read-back check: only
    bench/bench_readback.py, to measure what it costs. Returns the (first) output path."""
    reader = open_reader(src)
    shards = getattr(reader, "shards", [(Path(src), reader)])
    outs = output_names(out, len(shards))
    for o in outs:
        if o.exists() and not force:
            raise LexiError(f"{o} already exists; pass --force to overwrite it")
    if not outs[0].parent.exists():
        raise LexiError(f"output folder {outs[0].parent} does not exist")
    paths = [p for p, _ in shards]
    need = copy_space(paths, outs[0].parent) if tensor_data is None else sum(p.stat().st_size for p in paths)
    require_free(outs[0].parent, need, f"writing {outs[0].name}")
    with ExitStack() as stack:
        tmp_first = stack.enter_context(atomic_output(outs[0], force))
        for (p, r), o in zip(shards[1:], outs[1:]):
            tmp = stack.enter_context(atomic_output(o, force))
            if tensor_data is None:
                tmp.unlink()
                if link_or_copy(p, tmp) == "copied":     # a copy across file systems: read it back too
                    check_copy(p, tmp, o.name)
            else:                    # the shard's own metadata (split.no, ...) as it is, its tensors transformed
                _write_gguf(r, tmp, {}, "\0", progress, tensor_data, same_shapes,
                            arch=field_value(shards[0][1], "general.architecture"), shown=o.name, read_back=read_back)
        _write_gguf(shards[0][1], tmp_first, new, drop_prefix, progress, tensor_data or (lambda t: t.data),
                    same_shapes or tensor_data is None, shown=outs[0].name, read_back=read_back)
    del reader, shards
    return outs[0]


def check_copy(src: Path, copy: Path, shown: str) -> None:
    """A shard copied as it is: the same bytes (compared streamed), a GGUF llama.cpp can load."""
    with open(src, "rb") as a, open(copy, "rb") as b:
        while True:
            x, y = a.read(16 << 20), b.read(16 << 20)
            if x != y:
                raise WriteCheckError(f"the copied shard {shown} differs from {src.name} near byte {a.tell() - len(x):,}; "
                                      "it was not kept (a failing disk?)")
            if not x:
                break
    scan(copy)


def _write_gguf(reader, tmp: Path, new: dict, drop_prefix: str, progress: bool, tensor_data, same_shapes: bool,
                arch: str | None = None, shown: str | None = None, read_back: bool = True) -> None:
    """One GGUF file: reader's fields (less drop_prefix keys and those in `new`) + `new`, then its
    tensors (tensor_data(t) of each), streamed, at the source's data alignment. The header needs every
    tensor's shape before any data: from the source's (memory-mapped, nothing read) when same_shapes,
    else from tensor_data. The file is read back and checked as it is written (verify.ReadBack) before
    the caller renames it."""
    gguf = gguf_py()
    arch = arch or field_value(reader, "general.architecture")    # a later shard may not state it
    writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
    writer.data_alignment = reader.alignment     # general.alignment is copied below: the data must follow it
    meant = {gguf.Keys.General.ARCHITECTURE: arch}
    for f in reader.fields.values():
        if (f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF.") or f.name in new
                or (f.name.startswith(drop_prefix) and f.name not in keys.TENSOR_KEYS)):
            continue
        vt = f.types[0]
        sub = f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
        meant[f.name] = f.contents()
        writer.add_key_value(f.name, meant[f.name], vt, sub_type=sub)
    for name, (val, vt, sub) in new.items():
        writer.add_key_value(name, val, vt, sub_type=sub)
        meant[name] = val
    total = 0
    meant_tensors = []
    for t in reader.tensors:
        d = t.data if same_shapes else tensor_data(t)
        total += int(d.nbytes)
        writer.add_tensor_info(t.name, d.shape, d.dtype, d.nbytes, t.tensor_type)
        meant_tensors.append(Written(t.name, _ne(t, d, same_shapes), int(t.tensor_type), int(d.nbytes)))
    check = ReadBack(tmp, meant_tensors, meant, reader.alignment, shown) if read_back else None
    _stream(writer, check, (tensor_data(t) for t in reader.tensors), total, "write + read back" if check else "write",
            progress, reader.endianess)


def _stream(writer, check, datas, total: int, desc: str, progress: bool, endianess=None) -> None:
    """Header, then each tensor's data in order, each compared with what was given right after it is
    written (check: a verify.ReadBack, or None); the temp file discarded on any error."""
    bar = None
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.flush()
        if check:
            check.header()
        if progress:
            from tqdm import tqdm
            bar = tqdm(desc=desc, total=total, unit="B", unit_scale=True)
        for i, d in enumerate(datas):
            writer.write_tensor_data(d, **({"tensor_endianess": endianess} if endianess is not None else {}))
            if check:
                writer.flush()
                check.data(i, d)
            else:
                release(d)           # a source tensor's mapped pages once written (ReadBack does it after comparing)
            if bar:
                bar.update(int(d.nbytes))
    except BaseException:
        if check:
            check.discard()
        raise
    finally:
        writer.close()
        if bar:
            bar.close()
    if check:
        check.close()


def _ne(t, d, same_shapes: bool) -> tuple[int, ...]:
    """The ggml shape (ne[0] first) a tensor is meant to have: the source's, or that of the data given
    (a quantized tensor's data is bytes: its element shape comes from the type's block size)."""
    if same_shapes:
        return tuple(int(n) for n in t.shape)
    shape = d.shape
    if d.dtype == np.uint8:       # quantized types travel as bytes (I8 as int8)
        from gguf.quants import quant_shape_from_byte_shape
        shape = quant_shape_from_byte_shape(shape, t.tensor_type)
    return tuple(int(n) for n in reversed(shape))


def write_new(out: str | Path, arch: str, kv: dict, tensors: list[tuple[str, tuple[int, ...], int, int]], data_of,
              *, force: bool = False, progress: bool = True) -> Path:
    """A new GGUF from keys (name -> (value, GGUFValueType, sub_type)) and tensors made one at a time:
    tensors[i] = (name, ne (ggml order), ggml type, bytes), data_of(i) its data (quantized types as uint8
    bytes, others as numpy arrays of their type). The same temp file, read-back and rename as a copy."""
    gguf = gguf_py()
    out = Path(out)
    if not out.parent.exists():
        raise LexiError(f"output folder {out.parent} does not exist")
    require_free(out.parent, sum(t[3] for t in tensors) + (64 << 20), f"writing {out.name}")
    with atomic_output(out, force) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=arch)
        meant = {gguf.Keys.General.ARCHITECTURE: arch}
        for name, (val, vt, sub) in kv.items():
            writer.add_key_value(name, val, vt, sub_type=sub)
            meant[name] = val
        written = []
        for name, ne, ty, nb in tensors:
            qt = gguf.GGMLQuantizationType(ty)
            blk, size = gguf.GGML_QUANT_SIZES[qt]
            plain = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(qt)
            shape = tuple(reversed(ne)) if plain else tuple(reversed(ne[1:])) + (ne[0] // blk * size,)
            writer.add_tensor_info(name, shape, plain or np.uint8, nb, raw_dtype=qt)
            written.append(Written(name, tuple(ne), int(ty), int(nb)))
        check = ReadBack(tmp, written, meant, writer.data_alignment, out.name)
        _stream(writer, check, (data_of(i) for i in range(len(tensors))), sum(t[3] for t in tensors),
                f"write + read back {out.name}", progress)
    return out
