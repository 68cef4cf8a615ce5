"""The read-back of every file lexi-gguf writes, before its rename.

A file is checked by `check.scan`, a reader of its own (sharing no code with gguf-py's writer nor the
fast reader of lexi_gguf.gguf.reader), against what was meant to be written, in three steps as the
writer goes (ReadBack): once the header is written, its structure, every key's value, the alignment and
every tensor's name, type, shape and size; after each tensor's data, those bytes read back from the file
at the offset its header gives and compared with the data the writer was given, while they are still in
the page cache (at the end they would be read from the disk again: 17 s of a 52 s apply of a 17 GB
file), on a second thread while the writer goes on;
at the close, the whole structure again, the data's extent included. Any difference is a WriteCheckError
naming the tensor or key; the caller renames nothing.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import LexiError
from .check import MalformedGGUF, scan
from .pages import release

CHUNK = 64 << 20       # bytes compared at a time


class WriteCheckError(LexiError):
    """A file lexi-gguf wrote does not read back as meant: a lexi-gguf (or disk) fault, never renamed."""


@dataclass
class Written:
    """What the writer means one tensor to be: name, shape (ggml order, ne[0] first), type, bytes."""
    name: str
    ne: tuple[int, ...]
    ggml_type: int
    nbytes: int


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


class ReadBack:
    """The checks of one file being written: header() after its header, data(i, d) after tensor i's
    data, close() after the writer's close. kv: every key the file should hold (the writer's architecture
    key included) -> its value."""

    def __init__(self, path: Path, tensors: list[Written], kv: dict, alignment: int, shown: str | None = None):
        self.path, self.tensors, self.kv, self.alignment = path, tensors, kv, alignment
        self.shown, self.layout, self.fd = shown or path.name, None, None
        self._pool = self._pending = None

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = self._pending = None

    def discard(self) -> None:
        """The write failed: stop comparing, close the file."""
        self._shutdown()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def bad(self, msg: str):
        self.discard()
        raise WriteCheckError(f"the written {self.shown} does not read back as meant: {msg}; it was not kept (a "
                              "lexi-gguf bug or a failing disk: report it with the input file's name)")

    def _scan(self, header_only: bool):
        try:
            return scan(self.path, header_only=header_only)
        except MalformedGGUF as e:
            self.bad(f"at byte {e.offset:,} ({e.what}): {e}")

    def header(self) -> None:
        lay = self.layout = self._scan(header_only=True)
        if set(lay.kv) != set(self.kv):
            self.bad(f"keys {sorted(set(lay.kv) - set(self.kv))} not meant, keys {sorted(set(self.kv) - set(lay.kv))} missing")
        for name, want in self.kv.items():
            if not _same(lay.kv[name][1], want):
                self.bad(f"key {name!r} reads back as {str(lay.kv[name][1]):.80}, meant {str(want):.80}")
        if lay.alignment != self.alignment:
            self.bad(f"its data alignment is {lay.alignment}, meant {self.alignment}")
        if len(lay.tensors) != len(self.tensors):
            self.bad(f"{len(lay.tensors)} tensors, meant {len(self.tensors)}")
        for t, w in zip(lay.tensors, self.tensors):
            got, meant = (t.name, tuple(t.ne), t.ggml_type, t.nbytes), (w.name, tuple(w.ne), w.ggml_type, w.nbytes)
            if got != meant:
                self.bad(f"tensor {w.name!r} reads back as (name, shape, ggml type, bytes) {got}, meant {meant}")
            if t.offset % self.alignment:
                self.bad(f"tensor {w.name!r} lies at byte {t.offset:,}, not a multiple of {self.alignment}")
        self.fd = os.open(self.path, os.O_RDONLY)

    def data(self, i: int, d: np.ndarray) -> None:
        """Tensor i's bytes as the file holds them (the writer flushed them) against `d`, compared on a
        second thread while the writer goes on with the next tensor (one comparison in flight)."""
        if self._pending is not None:
            self._wait()
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="lexi-read-back")
        self._pending = self._pool.submit(self._compare, self.layout.tensors[i], d)

    def _wait(self) -> None:
        problem, self._pending = self._pending.result(), None
        if problem:
            self.bad(problem)

    def _compare(self, t, d: np.ndarray) -> str | None:
        """The file's pages mapped and compared with d 8 bytes at a time, no copy (numpy lets go of the GIL:
        ~4.6 GB/s from the page cache). A problem's text, or None."""
        if t.nbytes == 0:
            return None
        want = np.ascontiguousarray(d).reshape(-1).view(np.uint8)
        start = t.offset - t.offset % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(self.fd, t.offset + t.nbytes - start, offset=start, access=mmap.ACCESS_READ) as m:
            got = np.frombuffer(m, dtype=np.uint8, count=t.nbytes, offset=t.offset - start)
            n8, problem = t.nbytes // 8 * 8, None
            for at in range(0, n8, CHUNK):     # chunks: the comparison's temporary stays small
                end = min(at + CHUNK, n8)
                if not np.array_equal(got[at:end].view(np.uint64), want[at:end].view(np.uint64)):
                    problem = f"tensor {t.name!r}: its bytes at file offset {t.offset + at:,}.. differ from those written"
                    break
            if problem is None and not np.array_equal(got[n8:], want[n8:]):
                problem = f"tensor {t.name!r}: its last bytes differ from those written"
            del got       # the map closes only once no view of it is left
        release(d)        # the source's mapped pages, compared: out of this process's RSS (gguf.pages)
        return problem

    def close(self) -> None:
        if self._pending is not None:
            self._wait()
        self.discard()
        lay = self._scan(header_only=False)       # the data's extent: every tensor inside the file
        end = max((t.offset + t.nbytes for t in lay.tensors), default=lay.data_start)
        if lay.file_size < end:
            self.bad(f"it ends at byte {lay.file_size:,}, its last tensor at {end:,}")
