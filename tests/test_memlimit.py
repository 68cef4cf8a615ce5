"""`bench --mem-limit`: sizes, cgroup detection and its errors, page-cache eviction, and one real run of a
child under a memory cgroup (where the machine lets us: root and a memory controller)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from lexi_gguf import LexiError
from lexi_gguf.measure import memlimit
from lexi_gguf.measure.memlimit import cgroup


@pytest.mark.parametrize("text,n", [("3G", 3 * 2**30), ("3.5GiB", int(3.5 * 2**30)), ("512M", 512 * 2**20),
                                    ("512m", 512 * 2**20), ("2GB", 2 * 10**9), ("100MiB", 100 * 2**20),
                                    ("4096", 4096), ("1.5 G", int(1.5 * 2**30)), (1000, 1000)])
def test_parse_size(text, n):
    assert memlimit.parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "G", "3X", "-1G", "0", "1.2.3G", "three gigs", 0])
def test_parse_size_refuses(bad):
    with pytest.raises(LexiError, match="size"):
        memlimit.parse_size(bad)


def _fake_v1(tmp_path: Path) -> Path:
    (tmp_path / "memory").mkdir(parents=True)
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    return tmp_path


def test_detect(tmp_path):
    assert memlimit.detect(_fake_v1(tmp_path / "a")) == (1, tmp_path / "a" / "memory")
    v2 = tmp_path / "b"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert memlimit.detect(v2) == (2, v2)
    none = tmp_path / "c"
    none.mkdir()
    (none / "cgroup.controllers").write_text("cpu pids\n")   # v2 without memory, no v1 either
    with pytest.raises(LexiError, match="no cgroup memory controller"):
        memlimit.detect(none)


def test_not_root_is_one_clear_line(tmp_path, monkeypatch):
    root = _fake_v1(tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(LexiError, match="needs root") as e:
        with memlimit.memory_cgroup("1G", root=root):
            pass
    assert "\n" not in str(e.value)
    assert list((root / "memory").iterdir()) == [root / "memory" / "memory.limit_in_bytes"]   # nothing made


def test_no_controller_and_tiny_limit(tmp_path):
    with pytest.raises(LexiError, match="no cgroup memory controller"):
        with memlimit.memory_cgroup("1G", root=tmp_path):
            pass
    with pytest.raises(LexiError, match="below the minimum"):
        with memlimit.memory_cgroup("1M", root=_fake_v1(tmp_path)):
            pass


def test_group_made_and_removed_in_a_fake_hierarchy(tmp_path, monkeypatch):
    """The files written and the cleanup, against a plain directory standing in for cgroupfs
    (rmdir of a real cgroup removes its control files with it; here the test removes them)."""
    root = _fake_v1(tmp_path)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real_remove = cgroup.remove_group

    def remove(group, tries=50):
        for f in group.path.iterdir():
            f.unlink()
        real_remove(group, tries)
    monkeypatch.setattr(cgroup, "remove_group", remove)
    with pytest.raises(RuntimeError):
        with memlimit.memory_cgroup("256M", root=root, name="g") as g:
            assert (g.path / "memory.limit_in_bytes").read_text().strip() == str(256 * 2**20)
            raise RuntimeError("the body failed")
    assert not (root / "memory" / "g").exists()


def test_evict_drops_the_files_pages(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(os.urandom(8 << 20))
    with open(f, "rb") as fh:
        fh.read()                                    # cached (and dirty pages written back by evict)
    r0 = memlimit.resident_bytes(f)
    if r0 is None:
        pytest.skip("mincore is not available here")
    assert r0 > 4 << 20
    ev = memlimit.evict(f)
    assert ev["resident_before"] > 4 << 20
    assert ev["resident_after"] == memlimit.resident_bytes(f) < 256 << 10
    with open(f, "rb") as fh:
        fh.read(1 << 20)
    assert memlimit.resident_bytes(f) >= 1 << 20     # and reading brings them back


def test_disk_of(tmp_path):
    d = memlimit.disk_of(tmp_path)
    assert set(d) >= {"dev", "name", "rotational"}


def _can_cgroup() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root"
    try:
        memlimit.detect()
    except LexiError as e:
        return str(e)
    return None


@pytest.mark.skipif(_can_cgroup() is not None, reason=f"no memory cgroup here: {_can_cgroup()}")
def test_real_child_under_a_limit(tiny_gguf, workdir):
    """A real child joins a fresh cgroup, loads the tiny model mmapped, decodes, reports its counters;
    the group is gone afterwards."""
    from lexi_gguf.measure.configs import run_configs
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.pin import expert_ranges          # the pin experiment lives in bench/
    path = tiny_gguf("olmoe")
    limit = memlimit.parse_size("256M")
    cfg = run_configs(path, [])[0]
    pin = expert_ranges(path)[(1, 3)] + expert_ranges(path)[(2, 0)]     # two experts, 3 tensors each
    with memlimit.memory_cgroup(limit) as g:
        where = g.path
        assert (g.path / "cgroup.procs").exists()
        spec = {"model": str(path), "kv": cfg.kv, "n_gen": 4, "warmup": 2, "threads": 2, "cgroup": str(g.path),
                "version": g.version, "limit": limit, "pin": pin, "prompt": "The quick brown fox"}
        r = memlimit.run_child(spec, timeout=120)
        again = memlimit.run_child({**spec, "pin": None, "prefetch": "chosen"}, timeout=120)
        peak = g.peak()
    assert not where.exists()
    size = path.stat().st_size
    assert r["evicted"]["resident_after"] is None or r["evicted"]["resident_after"] < size
    assert r["load_read_bytes"] is not None and r["load_read_bytes"] >= 0.5 * size   # read from disk through the group
    for key in ("majflt", "read_bytes", "rss_anon_bytes"):
        assert r[key] is not None, key
    # sampled text, seeded: every run decodes the same tokens (pinned or not, prefetch or not)
    assert len(r["tokens"]) > 6 and again["tokens"] == r["tokens"] and again["locked_bytes"] == 0
    # the pinned experts' slices are locked in the child (whole pages around each slice)
    assert len(pin) == 6 and r["pinned_bytes"] == sum(n for _, n in pin) <= r["locked_bytes"]
    # the decode's clock covers its four timed tokens and little else
    assert len(r["token_ms"]) == 4 and 0.5 * r["decode_s"] <= sum(r["token_ms"]) / 1e3 <= r["decode_s"]
    # the group was charged for the child: at least the model file it read through it (a child outside
    # the group would leave its peak near zero)
    assert peak is not None and peak >= size


@pytest.mark.skipif(_can_cgroup() is not None, reason=f"no memory cgroup here: {_can_cgroup()}")
def test_bench_mem_limited_rows(laddered_gguf):
    """The whole bench on a file with a ladder: full, uniform and lexi rows with the per-token counters."""
    res = memlimit.bench_mem_limited(laddered_gguf, [0.5], mem_limit="256M", n_gen=3, warmup=1, threads=2,
                                     rates=False, progress=False, timeout=120)
    assert [r["config"] for r in res["rows"]] == ["full", "uniform", "lexi"]
    assert res["mem_limit_bytes"] == 256 * 2**20 and res["model_bytes"] == laddered_gguf.stat().st_size
    assert res["machine"]["cores"] and res["disk"]["dev"]
    for r in res["rows"]:
        assert r["read_bytes_per_token"] is not None
        assert r["tg_tps"] == pytest.approx(3 / r["reps"][0]["decode_s"])       # one repetition: its own rate
        assert r["peak_bytes"] >= res["model_bytes"]     # each child ran inside its group (see above)
    assert "major faults / token" in memlimit.table(res)
    leftovers = [p for p in memlimit.detect()[1].iterdir() if p.name.startswith(f"lexi-gguf-{os.getpid()}-")]
    assert leftovers == []
