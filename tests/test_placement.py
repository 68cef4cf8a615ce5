"""Where CPU weights live (runtime.placement): with repack on, ggml copies a Q4_0 model's weights into
its repacked layout (anonymous memory: llama.cpp's loader reports a CPU_REPACK buffer); with repack off
(llama.cpp's --no-repack) they are used in place from the mapped file, and the model answers the same
up to the kernels' rounding. auto turns it off with prefetch and for a model larger than the memory
left, and says so once; llama-server gets --no-repack in the same cases."""
from __future__ import annotations

import re

import numpy as np
import pytest

from lexi_gguf import LexiError
from lexi_gguf.runtime import llama as runtime
from lexi_gguf.runtime import placement

PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931]


@pytest.fixture(scope="module")
def q4_0_gguf(expert_heavy_gguf, workdir):
    from lexi_gguf.export.convert import quantize
    out = workdir / "olmoe-expert-heavy-Q4_0.gguf"
    if not out.exists():
        quantize(expert_heavy_gguf, out, "Q4_0", threads=2)
    return out


def _buffers(log: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB", log)}


def _logits(path, repack):
    llm = runtime.load(path, n_ctx=64, logits_all=True, n_threads=2, repack=repack)
    bufs = _buffers(runtime.captured_log())
    llm.eval(PROMPT)
    out = np.array(llm.scores[: len(PROMPT)], dtype=np.float32)
    assert llm._lexi_repack == (repack == "on")
    llm.close()
    return out, bufs


def test_repack_off_reads_weights_in_place(q4_0_gguf):
    on, bufs_on = _logits(q4_0_gguf, "on")
    off, bufs_off = _logits(q4_0_gguf, "off")
    from lexi_gguf.gguf.reader import open_reader
    tensors = open_reader(q4_0_gguf).tensors
    experts_mib = sum(int(t.n_bytes) for t in tensors if "_exps" in t.name) / 2**20
    # on: at least the Q4_0 experts are copied into the repacked buffer; off: no such buffer
    assert bufs_on.get("CPU_REPACK", 0) >= 0.95 * experts_mib, (bufs_on, experts_mib)
    assert "CPU_REPACK" not in bufs_off and bufs_off["CPU_Mapped"] >= 0.9 * q4_0_gguf.stat().st_size / 2**20, bufs_off
    # other kernels, same model: equal to rounding, same next token everywhere
    assert np.abs(on - off).max() < 1e-2 * np.abs(on).max()
    assert (on.argmax(1) == off.argmax(1)).all()


def test_auto_turns_repack_off_for_prefetch_and_for_a_model_larger_than_memory(q4_0_gguf, monkeypatch, capsys):
    monkeypatch.setattr(placement, "_said", set())
    assert placement.decide(q4_0_gguf, "auto", "off") is True        # fits: llama.cpp's default
    assert placement.decide(q4_0_gguf, "auto", "chosen") is False
    assert "--prefetch reads experts from the mapped file" in capsys.readouterr().err
    monkeypatch.setattr(placement, "available_bytes", lambda: 1 << 20)
    assert placement.decide(q4_0_gguf, "auto", "off") is False
    assert placement.decide(q4_0_gguf, "auto", "off") is False
    said = [x for x in capsys.readouterr().err.splitlines() if "larger than the memory available" in x]
    assert len(said) == 1 and "(0.00 GiB)" in said[0]                # said once, with both sizes
    assert placement.decide(q4_0_gguf, "on", "chosen") is True         # asked for: kept
    from lexi_gguf.runtime.options import LoadOptions
    from lexi_gguf.serve import llama_server
    assert "--no-repack" in llama_server.slot_args(q4_0_gguf, 64, 1, LoadOptions())
    with pytest.raises(LexiError, match="unknown repack mode"):
        placement.decide(q4_0_gguf, "sometimes", "off")


def test_cgroup_room_is_read_from_this_process_group(tmp_path):
    """v2: memory.max - memory.current of the group /proc/self/cgroup names; v1: limit - usage; no limit: None."""
    proc = tmp_path / "cgroup"
    g = tmp_path / "sys" / "lexi" / "bench"
    g.mkdir(parents=True)
    (g / "memory.max").write_text("1000000\n")
    (g / "memory.current").write_text("300000\n")
    proc.write_text("0::/lexi/bench\n")
    assert placement.cgroup_room(proc, tmp_path / "sys") == 700000
    (g / "memory.max").write_text("max\n")
    assert placement.cgroup_room(proc, tmp_path / "sys") is None
    v1 = tmp_path / "sys" / "memory" / "g"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("5000\n")
    (v1 / "memory.usage_in_bytes").write_text("7000\n")
    proc.write_text("12:cpu,cpuacct:/x\n5:memory:/g\n")
    assert placement.cgroup_room(proc, tmp_path / "sys") == 0       # over the limit: no room, not negative


def test_model_bytes_counts_every_shard_by_name(tmp_path):
    for i, n in enumerate((100, 250, 50), 1):
        (tmp_path / f"m-{i:05d}-of-00003.gguf").write_bytes(b"\0" * n)
    (tmp_path / "single.gguf").write_bytes(b"\0" * 7)
    assert placement.model_bytes(tmp_path / "m-00001-of-00003.gguf") == 400
    assert placement.model_bytes(tmp_path / "single.gguf") == 7


def test_each_load_has_its_own_repack_mode(tmp_path, monkeypatch):
    """No process-wide default that a command sets and later loads read back: the mode is the one in the
    options a load (or llama-server's command line) is given, and two option sets in one process differ."""
    from lexi_gguf.runtime.options import LoadOptions
    from lexi_gguf.serve.llama_server import slot_args
    f = tmp_path / "m.gguf"
    f.write_bytes(b"\0" * 4096)
    monkeypatch.setattr(placement, "available_bytes", lambda: 1024)      # the file is larger than memory
    monkeypatch.setattr(placement, "_said", set())
    assert "--no-repack" in slot_args(f, 64, 1, LoadOptions())                  # auto: off
    assert "--no-repack" not in slot_args(f, 64, 1, LoadOptions(repack="on"))   # asked for: kept
    assert "--no-repack" in slot_args(f, 64, 1, LoadOptions())                  # and auto again after it
    assert not hasattr(placement, "set_default")
    with pytest.raises(LexiError, match="unknown repack mode"):
        LoadOptions(repack="sometimes")
