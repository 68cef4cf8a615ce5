"""Structural checks of GGUF files, independent of the reader that parses them for use.

`scan` walks a file's header with a bound on every read and checks what llama.cpp's own loader
(ggml/src/gguf.cpp) checks: magic and version, counts, key names, value types, string and array
lengths, tensor names, dimensions, ggml types, and that each tensor's data lies where the loader
expects it (in order, each padded to the alignment, inside the file). A problem is a MalformedGGUF
that names the byte offset and the field, so a damaged download is told apart from a lexi-gguf bug.
It also returns the layout (where each field lies), which the mutation tests aim at.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import LexiError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4          # GGML_MAX_DIMS
MAX_NAME = 64         # GGML_MAX_NAME, with its terminating zero: names are at most 63 bytes
# value types (gguf.h: enum gguf_type) -> struct format of a scalar; 8 STRING and 9 ARRAY are variable
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
T_STRING, T_ARRAY = 8, 9
TYPE_NAMES = {0: "u8", 1: "i8", 2: "u16", 3: "i16", 4: "u32", 5: "i32", 6: "f32", 7: "bool", 8: "string",
              9: "array", 10: "u64", 11: "i64", 12: "f64"}


class MalformedGGUF(LexiError):
    """The file breaks the GGUF format: `offset` and `what` say where. Its own fault, not lexi-gguf's."""

    def __init__(self, path: Path, offset: int, what: str, problem: str):
        self.offset, self.what = offset, what
        super().__init__(f"{path} is not a valid GGUF file: at byte {offset:,} ({what}): {problem}; the file "
                         "is damaged or was written wrongly: re-download or re-convert it")


@dataclass
class Region:
    """One field of the header: where it lies, what it is, and its kind for the mutation tests
    (count, strlen, type, dims, ggml_type, offset, key, value)."""
    offset: int
    size: int
    what: str
    kind: str


@dataclass
class TensorEntry:
    name: str
    ne: tuple[int, ...]
    ggml_type: int
    offset: int          # absolute, in the file
    nbytes: int


@dataclass
class Layout:
    version: int
    alignment: int
    data_start: int
    file_size: int
    kv: dict[str, tuple[int, object]] = field(default_factory=dict)   # key -> (value type, value)
    tensors: list[TensorEntry] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)


def gguf_py():
    try:
        import gguf
    except ImportError:
        raise LexiError("gguf-py is not installed; run `make setup` (it installs the pinned llama.cpp's gguf-py)") from None
    return gguf


def _ggml_sizes() -> dict[int, tuple[int, int]]:
    """ggml type id -> (block size, bytes per block), from gguf-py's table of the pinned llama.cpp."""
    gguf = gguf_py()
    return {int(t): v for t, v in gguf.GGML_QUANT_SIZES.items()}


class _Cursor:
    def __init__(self, path: Path, buf, layout: Layout | None):
        self.path, self.buf, self.pos, self.layout = path, buf, 0, layout

    def fail(self, at: int, what: str, problem: str):
        raise MalformedGGUF(self.path, at, what, problem)

    def take(self, fmt: str, what: str, kind: str = "value"):
        n = struct.calcsize("<" + fmt)
        if self.pos + n > len(self.buf):
            self.fail(self.pos, what, f"the file ends after {len(self.buf):,} bytes, inside this field")
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        if self.layout is not None:
            self.layout.regions.append(Region(self.pos, n, what, kind))
        self.pos += n
        return v

    def string(self, what: str, *, limit: int | None = None) -> str:
        at = self.pos
        n = self.take("Q", f"{what}: length", "strlen")
        if limit is not None and n > limit:
            self.fail(at, what, f"length {n:,} is longer than the {limit} bytes allowed")
        if self.pos + n > len(self.buf):
            self.fail(at, what, f"length {n:,} runs past the end of the file ({len(self.buf):,} bytes)")
        raw = bytes(self.buf[self.pos:self.pos + n])
        if self.layout is not None and n:
            self.layout.regions.append(Region(self.pos, n, what, "text"))
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(at + 8 + e.start, what, "not valid UTF-8 text")


def _value(c: _Cursor, vtype: int, what: str):
    if vtype in SCALARS:
        return c.take(SCALARS[vtype], what)
    if vtype == T_STRING:
        return c.string(what)
    c.fail(c.pos, what, f"unknown value type {vtype}")


def _strings(c: _Cursor, key: str, n: int) -> list[str]:
    """n strings of an array (a vocabulary: 50k-250k), bounds and UTF-8 checked in one tight loop."""
    buf, pos, end, out = c.buf, c.pos, len(c.buf), []
    unpack = struct.Struct("<Q").unpack_from
    for j in range(n):
        if pos + 8 > end:
            c.fail(pos, f"key {key!r}[{j}]: length", f"the file ends after {end:,} bytes, inside this field")
        (size,) = unpack(buf, pos)
        if size > end - pos - 8:
            c.fail(pos, f"key {key!r}[{j}]", f"length {size:,} runs past the end of the file ({end:,} bytes)")
        try:
            out.append(str(buf[pos + 8:pos + 8 + size], "utf-8"))
        except UnicodeDecodeError as e:
            c.fail(pos + 8 + e.start, f"key {key!r}[{j}]", "not valid UTF-8 text")
        pos += 8 + size
    if c.layout is not None and n:
        c.layout.regions.append(Region(c.pos, pos - c.pos, f"key {key!r}: values", "text"))
    c.pos = pos
    return out


def _kv(c: _Cursor, i: int, n_kv: int):
    at = c.pos
    key = c.string(f"key {i + 1} of {n_kv}: name")
    if not key:
        c.fail(at, f"key {i + 1} of {n_kv}", "empty key name")
    tat = c.pos
    vtype = c.take("I", f"key {key!r}: value type", "type")
    if vtype == T_ARRAY:
        sat = c.pos
        sub = c.take("I", f"key {key!r}: array element type", "type")
        nat = c.pos
        n = c.take("Q", f"key {key!r}: array length", "count")
        if sub == T_ARRAY:
            c.fail(sat, f"key {key!r}", "arrays of arrays are not supported by llama.cpp")
        if sub in SCALARS:
            size = struct.calcsize("<" + SCALARS[sub])
            if c.pos + n * size > len(c.buf):
                c.fail(nat, f"key {key!r}: array length", f"{n:,} elements of {TYPE_NAMES[sub]} run past the end "
                       f"of the file ({len(c.buf):,} bytes)")
            val = np.frombuffer(c.buf, dtype="<" + SCALARS[sub], count=n, offset=c.pos).copy() if n else []
            if c.layout is not None and n:
                c.layout.regions.append(Region(c.pos, n * size, f"key {key!r}: values", "value"))
            c.pos += n * size
            return key, vtype, list(val) if n < 4096 else val
        if sub != T_STRING:
            c.fail(sat, f"key {key!r}: array element type", f"unknown value type {sub}")
        if n > len(c.buf) // 8:
            c.fail(nat, f"key {key!r}: array length", f"{n:,} strings cannot fit in a file of {len(c.buf):,} bytes")
        return key, vtype, _strings(c, key, n)
    if vtype not in SCALARS and vtype != T_STRING:
        c.fail(tat, f"key {key!r}: value type", f"unknown value type {vtype}")
    return key, vtype, _value(c, vtype, f"key {key!r}: value")


def scan(path: str | Path, *, regions: bool = False, header_only: bool = False) -> Layout:
    """Check a GGUF's structure as llama.cpp's loader does; MalformedGGUF at the first problem.
    header_only: a file whose tensor data is still being written (no check that the data fits)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        import mmap
        if size == 0:
            raise MalformedGGUF(path, 0, "magic", "the file is empty")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    mv = memoryview(buf)
    try:
        return _scan(path, mv, size, regions, header_only)
    finally:
        mv.release()
        buf.close()


def _scan(path: Path, buf, size: int, regions: bool, header_only: bool = False) -> Layout:
    layout = Layout(0, DEFAULT_ALIGNMENT, 0, size)
    c = _Cursor(path, buf, layout if regions else None)
    if bytes(buf[:4]) != GGUF_MAGIC:
        c.fail(0, "magic", f"starts with {bytes(buf[:4])!r}, not b'GGUF': this is not a GGUF file")
    c.take("4s", "magic", "magic")
    layout.version = c.take("I", "version", "version")
    if layout.version not in (2, 3):
        c.fail(4, "version", f"GGUF version {layout.version}; llama.cpp reads versions 2 and 3")
    n_tensors = c.take("Q", "tensor count", "count")
    n_kv = c.take("Q", "key/value count", "count")
    # every key takes at least 12 bytes, every tensor info at least 24: a count that cannot fit is caught now
    if n_kv > size // 12:
        c.fail(16, "key/value count", f"{n_kv:,} keys cannot fit in a file of {size:,} bytes")
    if n_tensors > size // 24:
        c.fail(8, "tensor count", f"{n_tensors:,} tensors cannot fit in a file of {size:,} bytes")
    for i in range(n_kv):
        at = c.pos
        key, vtype, val = _kv(c, i, n_kv)
        if key in layout.kv:
            c.fail(at, f"key {key!r}", "the key appears twice")
        layout.kv[key] = (vtype, val)
    if "general.alignment" in layout.kv:
        vtype, a = layout.kv["general.alignment"]
        if vtype != 4 or a == 0 or a & (a - 1):
            c.fail(0, "key 'general.alignment'", f"{a!r} ({TYPE_NAMES.get(vtype, vtype)}) is not a u32 power of two")
        layout.alignment = int(a)
    sizes = _ggml_sizes()
    infos = []
    seen = set()
    for i in range(n_tensors):
        at = c.pos
        name = c.string(f"tensor {i + 1} of {n_tensors}: name", limit=MAX_NAME - 1)
        if name in seen:
            c.fail(at, f"tensor {name!r}", "the name appears twice")
        seen.add(name)
        dat = c.pos
        n_dims = c.take("I", f"tensor {name!r}: dimension count", "dims")
        if not 1 <= n_dims <= MAX_DIMS:
            c.fail(dat, f"tensor {name!r}: dimension count", f"{n_dims}, llama.cpp allows 1 to {MAX_DIMS}")
        ne = tuple(c.take("Q", f"tensor {name!r}: ne[{d}]", "dims") for d in range(n_dims))
        if any(n >= 1 << 63 for n in ne):
            c.fail(dat + 4, f"tensor {name!r}: shape", f"dimension {max(ne):,} is negative as int64")
        n_el = 1
        for n in ne:
            n_el *= n
        if n_el >= 1 << 63:
            c.fail(dat + 4, f"tensor {name!r}: shape", f"{ne} has more elements than int64 holds")
        tat = c.pos
        gtype = c.take("I", f"tensor {name!r}: ggml type", "ggml_type")
        if gtype not in sizes:
            c.fail(tat, f"tensor {name!r}: ggml type", f"unknown ggml type {gtype}")
        block, bsize = sizes[gtype]
        if ne[0] % block:
            c.fail(dat + 4, f"tensor {name!r}: ne[0]", f"{ne[0]} is not a multiple of the {block}-element block "
                   f"of its type {gtype}")
        oat = c.pos
        rel = c.take("Q", f"tensor {name!r}: data offset", "offset")
        infos.append((name, ne, gtype, rel, n_el // block * bsize, oat))
    layout.data_start = -(-c.pos // layout.alignment) * layout.alignment
    expect = 0
    for name, ne, gtype, rel, nbytes, oat in infos:
        if rel != expect:     # gguf.cpp: tensors in order, each at the previous one's padded end
            c.fail(oat, f"tensor {name!r}: data offset", f"{rel:,}, where llama.cpp expects {expect:,} (tensor data "
                   f"in header order, each padded to {layout.alignment} bytes)")
        if not header_only and layout.data_start + rel + nbytes > size:
            c.fail(oat, f"tensor {name!r}: data", f"{nbytes:,} bytes at {layout.data_start + rel:,} run past the "
                   f"end of the file ({size:,} bytes): the file is truncated")
        layout.tensors.append(TensorEntry(name, ne, gtype, layout.data_start + rel, nbytes))
        expect = rel + -(-nbytes // layout.alignment) * layout.alignment
    return layout


_checked: dict[tuple, Layout | MalformedGGUF] = {}


def check(path: str | Path) -> Layout:
    """scan(), remembered per (path, inode, size, mtime): a file opened many times is walked once, and a
    malformed one is refused each time with the same error."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _checked:
        _checked.clear()     # one file at a time is enough: keep no big vocabularies alive
        try:
            _checked[key] = scan(p)
        except MalformedGGUF as e:
            _checked[key] = e
    got = _checked[key]
    if isinstance(got, MalformedGGUF):
        raise got
    return got
