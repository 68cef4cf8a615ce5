"""The read-back of every file lexi-gguf writes, before its rename.

`verify_written` re-opens a file just written with `check.scan` (a reader of its own, sharing no code
with gguf-py's writer nor the fast reader of lexi_gguf.gguf.reader) and checks it against what was meant
to be written: the header, every key's value, every tensor's name, type, shape, offset and size, and a
CRC-32 of every tensor's bytes. Any difference is a WriteCheckError naming the tensor or key; the caller
renames nothing.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import LexiError
from .check import MalformedGGUF, scan


class WriteCheckError(LexiError):
    """A file lexi-gguf wrote does not read back as meant: a lexi-gguf (or disk) fault, never renamed."""


@dataclass
class Written:
    """What the writer meant one tensor to be: name, shape (ggml order, ne[0] first), type, bytes, CRC-32."""
    name: str
    ne: tuple[int, ...]
    ggml_type: int
    nbytes: int
    crc: int


def crc32(data) -> int:
    """CRC-32 of an array's bytes (zlib: ~3.5 GB/s on one core of an AVX512 Xeon)."""
    a = np.ascontiguousarray(data)
    return zlib.crc32(a.reshape(-1).view(np.uint8))


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple, np.ndarray)) or isinstance(b, (list, tuple, np.ndarray)):
        a, b = list(a), list(b)
        if a and isinstance(a[0], str) or b and isinstance(b[0], str):
            return a == b
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype.kind == "f" or b.dtype.kind == "f":
            return a.shape == b.shape and bool(np.array_equal(a.astype(np.float32), b.astype(np.float32), equal_nan=True))
        return a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return np.float32(a) == np.float32(b) or (a != a and b != b)
    return a == b


def verify_written(path: Path, tensors: list[Written], kv: dict, alignment: int, shown: str | None = None) -> None:
    """Re-open `path` with an independent reader and check it is what was meant: its structure as
    llama.cpp's loader reads it and every key's value (scan, which shares no code with gguf-py's writer
    or the fast reader), then every tensor's name, shape, type, offset and size, and a CRC-32 of its bytes
    read back from the file against the CRC of the data the writer was given. kv: every key the file should
    hold (the writer's architecture key included) -> its value. WriteCheckError if anything differs.
    (gguf-py's own GGUFReader would take ~4 s per 50k-token vocabulary, one numpy view per string: longer
    than a whole apply on a small model; the suite reads outputs back with it too.)"""
    import mmap
    shown = shown or path.name

    def bad(msg: str):
        raise WriteCheckError(f"the written {shown} does not read back as meant: {msg}; it was not kept (a "
                              "lexi-gguf bug or a failing disk: report it with the input file's name)")
    try:
        layout = scan(path)
    except MalformedGGUF as e:
        bad(f"at byte {e.offset:,} ({e.what}): {e}")
    if set(layout.kv) != set(kv):
        extra, missing = sorted(set(layout.kv) - set(kv)), sorted(set(kv) - set(layout.kv))
        bad(f"keys {extra} not meant, keys {missing} missing")
    for name, want in kv.items():
        got = layout.kv[name][1]
        if not _same(got, want):
            bad(f"key {name!r} reads back as {str(got):.80}, meant {str(want):.80}")
    if layout.alignment != alignment:
        bad(f"its data alignment is {layout.alignment}, meant {alignment}")
    if len(layout.tensors) != len(tensors):
        bad(f"{len(layout.tensors)} tensors, meant {len(tensors)}")
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if layout.file_size else b""
    try:
        for t, w in zip(layout.tensors, tensors):
            if t.name != w.name:
                bad(f"tensor {w.name!r} reads back as {t.name!r}")
            if t.ggml_type != w.ggml_type:
                bad(f"tensor {w.name!r} has ggml type {t.ggml_type}, meant {w.ggml_type}")
            if tuple(t.ne) != tuple(w.ne):
                bad(f"tensor {w.name!r} has shape {tuple(t.ne)}, meant {tuple(w.ne)}")
            if t.nbytes != w.nbytes:
                bad(f"tensor {w.name!r} holds {t.nbytes:,} bytes, meant {w.nbytes:,}")
            if t.offset % alignment:
                bad(f"tensor {w.name!r} lies at byte {t.offset:,}, not a multiple of {alignment}")
            with memoryview(buf) as mv:
                if zlib.crc32(mv[t.offset:t.offset + t.nbytes]) != w.crc:
                    bad(f"tensor {w.name!r}: its bytes differ from those written (CRC-32)")
    finally:
        if layout.file_size:
            buf.close()
