"""Split GGUFs (NAME-00001-of-0000N.gguf) as users download them: made by the pinned converter's
--split-max-tensors and by llama-gguf-split, read, applied and run given the first shard."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lexi_gguf import cli
from lexi_gguf.export.hf_to_gguf import convert_to_gguf
from lexi_gguf.gguf.reader import model_info, open_reader
from lexi_gguf.runtime.llama import tool

from conftest import f32_logits

LEXI = [sys.executable, "-m", "lexi_gguf.cli"]


@pytest.fixture(scope="module")
def sets(hf_olmoe, llama_cpp_dir, tmp_path_factory):
    """One f32 file and the same model as two split sets: (single file, {maker: first shard})."""
    d = tmp_path_factory.mktemp("split")
    single = convert_to_gguf(hf_olmoe, d / "one.gguf", llama_cpp_dir)
    convert_to_gguf(hf_olmoe, d / "conv.gguf", llama_cpp_dir, extra=("--split-max-tensors", "20"))
    (d / "gs").mkdir()
    subprocess.run([str(tool("llama-gguf-split")), "--split", "--split-max-tensors", "25", str(single),
                    str(d / "gs" / "one")], check=True, capture_output=True)
    return single, {"converter": d / "conv-00001-of-00003.gguf", "gguf-split": d / "gs" / "one-00001-of-00003.gguf"}


@pytest.mark.parametrize("maker", ["converter", "gguf-split"])
def test_apply_and_run_a_split_set(sets, maker, tmp_path, capsys):
    single, firsts = sets
    first = firsts[maker]
    info = model_info(first)
    assert len(info.shards) == 3 and info.moe_layers == model_info(single).moe_layers == [0, 1, 2, 3]
    assert cli.main(["inspect", str(first)]) == 0
    assert "4 blocks (4 MoE)" in capsys.readouterr().out

    # profiled from every shard: the same table and k as the single file
    args = ["--budget", "0.75", "--samples", "256", "--seed", "3"]
    assert cli.main(["apply", str(single), "-o", str(tmp_path / "single-lexi.gguf"), *args]) == 0
    assert cli.main(["apply", str(first), "-o", str(tmp_path / "lexi.gguf"), *args]) == 0
    outs = [tmp_path / f"lexi-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert all(p.exists() for p in outs) and not (tmp_path / "lexi.gguf").exists()
    ref = model_info(tmp_path / "single-lexi.gguf").lexi
    got = model_info(outs[0]).lexi
    for key in ("lexi.expert_used_count", "lexi.sensitivity.deviation"):
        assert list(got[key]) == list(ref[key]), key
    # shards 2.. are the input's, as they were (hard links here); the new first shard's tensors too
    for src, out in zip(info.shards[1:], outs[1:]):
        assert out.stat().st_ino == src.stat().st_ino
    a, b = open_reader(first), open_reader(outs[0])
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a.tensors, b.tensors))
    # llama.cpp loads the set from its first shard and runs the stored k: logits equal the single file's
    np.testing.assert_array_equal(f32_logits(outs[0]), f32_logits(tmp_path / "single-lexi.gguf"))
    r = subprocess.run([*LEXI, "chat", str(outs[0]), "--max-tokens", "4"], input="Hello\n", capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "4 tokens" in r.stdout, r.stderr


def test_broken_sets_are_refused_by_name(sets, tmp_path):
    _, firsts = sets
    src = firsts["converter"]
    d = tmp_path / "set"
    d.mkdir()
    shards = [d / p.name for p in model_info(src).shards]
    for p, q in zip(model_info(src).shards, shards):
        q.write_bytes(p.read_bytes())
    out = tmp_path / "o.gguf"

    def refused(args, msg):
        r = subprocess.run([*LEXI, *args], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not list(tmp_path.glob("o*")) and not list(tmp_path.glob(".o*"))

    refused(["inspect", str(shards[1])], f"shard 2 of 3 of a split GGUF; pass {shards[0].name}")
    renamed = d / "model.gguf"
    renamed.hardlink_to(shards[0])
    refused(["chat", str(renamed)], "is not named like one")
    data = shards[2].read_bytes()
    shards[2].write_bytes(data[: len(data) // 2])
    refused(["apply", str(shards[0]), "-o", str(out), "--k", "4,3,2,1"], f"{shards[2]} is not a valid GGUF file: at byte")
    shards[2].unlink()
    refused(["apply", str(shards[0]), "-o", str(out), "--k", "4,3,2,1"], f"shard 3 of 3 is missing: {shards[2]}")
    refused(["chat", str(shards[0])], f"shard 3 of 3 is missing: {shards[2]}")
