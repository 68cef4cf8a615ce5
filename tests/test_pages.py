"""gguf.pages.release: a read-only mapping's pages leave the resident set once read; anything else is
left alone (on anonymous or copy-on-write memory MADV_DONTNEED would lose data)."""
from __future__ import annotations

import numpy as np

from lexi_gguf.gguf.pages import release


def rss_file_kb() -> int:
    line = next(x for x in open("/proc/self/status") if x.startswith("RssFile:"))
    return int(line.split()[1])


def test_release_unmaps_read_pages_and_keeps_the_data(tmp_path):
    f = tmp_path / "blob.bin"
    want = np.arange(16 << 20, dtype=np.uint32)           # 64 MiB
    want.tofile(f)
    m = np.memmap(f, dtype=np.uint32, mode="r")
    view = m[1000:]                                        # a view, not page-aligned: whole pages inside only
    before = rss_file_kb()
    assert int(view.sum(dtype=np.uint64)) == int(want[1000:].sum(dtype=np.uint64))
    touched = rss_file_kb()
    assert touched - before > 48 << 10                    # the read mapped most of 64 MiB
    assert release(view)
    assert rss_file_kb() - before < 1 << 10                # and release gave them back
    assert np.array_equal(view[:10], want[1000:1010])      # the data reads again from the page cache


def test_release_leaves_other_memory_alone(tmp_path):
    a = np.arange(1 << 20, dtype=np.uint32)
    assert not release(a) and a[12345] == 12345            # anonymous memory: untouched
    f = tmp_path / "blob.bin"
    a.tofile(f)
    for mode in ("c", "r+"):                               # copy-on-write / writable maps: untouched
        m = np.memmap(f, dtype=np.uint32, mode=mode)
        m[7] = 99
        assert not release(m) and m[7] == 99
        del m
