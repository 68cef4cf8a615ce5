"""Split GGUFs (`NAME-00001-of-00003.gguf`, ...): what llama.cpp's loader and llama-gguf-split agree on.
The first shard holds the metadata (split.count, split.no = 0); every shard holds some tensors.
A set is read as one file: metadata from the first shard, the tensors of all of them."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .. import LexiError
from . import keys

# llama_split_path: "%s-%05d-of-%05d.gguf" (split.no counts from 0, the name from 1)
_PATTERN = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def shard_name(prefix: str | Path, no: int, count: int) -> Path:
    """The path of shard `no` (0-based) of `count`, as llama.cpp names it."""
    return Path(f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf")


def split_prefix(path: str | Path) -> tuple[str, int, int] | None:
    """(prefix, shard index 0-based, count) if the name follows llama.cpp's split pattern."""
    m = _PATTERN.match(str(path))
    return (m["prefix"], int(m["no"]) - 1, int(m["count"])) if m else None


def output_names(out: str | Path, count: int) -> list[Path]:
    """Where a set of `count` shards written for `out` goes: `out` alone for one file; `out` itself if it
    is already the first shard's name, else NAME-0000i-of-0000N.gguf beside it (so llama.cpp finds
    every shard)."""
    out = Path(out)
    if count == 1:
        return [out]
    got = split_prefix(out)
    if got and got[1] == 0 and got[2] == count:
        prefix = got[0]
    else:
        prefix = str(out)[:-5] if out.name.endswith(".gguf") else str(out)
    return [shard_name(prefix, i, count) for i in range(count)]


class ShardedReader:
    """The shards of a split GGUF read as one: `fields` of the first shard, `tensors` of all, in order;
    `shards` lists (path, GGUFReader) for the writer."""

    def __init__(self, shards: list[tuple[Path, object]]):
        self.shards = shards
        first = shards[0][1]
        self.fields = first.fields
        self.endianess = first.endianess
        self.tensors = [t for _, r in shards for t in r.tensors]

    @property
    def paths(self) -> list[Path]:
        return [p for p, _ in self.shards]


def _int_field(reader, name: str):
    f = reader.fields.get(name)
    return None if f is None else int(f.contents())


def open_set(path: Path, first, open_one):
    """`first` (the reader of `path`) alone, or a ShardedReader over every shard it names. A shard that
    is missing, unreadable or from another set is a LexiError naming it."""
    count = _int_field(first, keys.SPLIT_COUNT) or 1
    no = _int_field(first, keys.SPLIT_NO) or 0
    if count <= 1:
        return first
    got = split_prefix(path)
    if no != 0:
        hint = f"; pass {shard_name(got[0], 0, count).name}" if got else ""
        raise LexiError(f"{path.name} is shard {no + 1} of {count} of a split GGUF{hint} (the first shard "
                        "holds the metadata)")
    if not got or got[1] != 0 or got[2] != count:
        raise LexiError(f"{path.name} is the first of {count} shards but is not named like one: llama.cpp "
                        f"finds the others only as NAME-00001-of-{count:05d}.gguf, ...; rename the set")
    shards = [(path, first)]
    for i in range(1, count):
        p = shard_name(got[0], i, count)
        if not p.exists():
            raise LexiError(f"shard {i + 1} of {count} is missing: {p} (split GGUF {path.name}); "
                            "download or copy the complete set")
        r = open_one(p)
        if (_int_field(r, keys.SPLIT_NO), _int_field(r, keys.SPLIT_COUNT)) != (i, count):
            raise LexiError(f"{p.name} does not say it is shard {i + 1} of {count} (split.no / split.count); "
                            "it belongs to another set, re-download it")
        shards.append((p, r))
    return ShardedReader(shards)


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link src to dst (same file system, no bytes written), else stream a copy. Returns how."""
    try:
        os.link(src, dst)
        return "linked"
    except OSError:
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            shutil.copyfileobj(fi, fo, 16 << 20)
        return "copied"
