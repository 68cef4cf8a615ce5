"""`lexi-gguf synth`: files at the exact shape of released MoEs. Each shape, cut to a layer or two (and fewer
experts where it has many), is written at a small quant mix, passes the project's checks, has the tensors
its record says (names, shapes, ggml types), real bytes on disk (no zero or sparse pages), the shipped
vocabulary at the released row count and a LExI ladder, loads in the runtime and decodes finite logits."""
from __future__ import annotations

import json
import os
from dataclasses import asdict

import numpy as np
import pytest

from lexi_gguf import LexiError, cli
from lexi_gguf.gguf import keys
from lexi_gguf.gguf.check import check, gguf_py
from lexi_gguf.gguf.reader import model_info, read_ladder
from lexi_gguf.runtime import llama as runtime
from lexi_gguf.testbeds import shapes as S
from lexi_gguf.testbeds import synth

# (shape, quant, layers, experts): small cuts of every shape, each quant mix and fallback exercised once
CASES = [("qwen3-30b-a3b", "IQ4_XS", 1, 16), ("mixtral-8x7b", "Q4_K_M", 1, None),
         ("deepseek-v2-lite", "Q4_K_M", 2, 16), ("olmoe-1b-7b", "Q8_0", 2, 16), ("gpt-oss-20b", "MXFP4", 2, 8)]


def decode(path, n: int = 4) -> list[np.ndarray]:
    llm = runtime.load(path, n_ctx=64, n_threads=2, logits_all=True)
    try:
        toks = llm.tokenize(b"The quick brown fox jumps")
        llm.eval(toks)
        out = []
        for _ in range(n):
            lg = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            out.append(lg)
            llm.eval([int(np.argmax(lg))])
        return out
    finally:
        llm.close()


@pytest.mark.parametrize("name,quant,layers,experts", CASES, ids=[c[0] for c in CASES])
def test_a_shape_writes_checks_loads_and_decodes(tmp_path, name, quant, layers, experts):
    full = S.get(name)
    s = S.reduced(full, layers, experts)
    r = synth.synth(s, quant, tmp_path / "m.gguf", full_layers=full.layers, cache=False, progress=False)
    path = r["path"]
    lay = check(path)                                          # the structure, as llama.cpp's loader checks it
    want = S.layout(s, quant)
    Q = gguf_py().GGMLQuantizationType
    got = {t.name: (tuple(t.ne), Q(t.ggml_type).name) for t in lay.tensors}
    assert got == {n: (tuple(ne), ty) for n, ne, _, ty in want}
    assert sum(t.nbytes for t in lay.tensors) == sum(S.nbytes(ne, ty) for _, ne, _, ty in want)
    # the record's numbers in the keys llama.cpp reads
    a = s.arch
    assert lay.kv[f"{a}.block_count"][1] == layers and lay.kv[f"{a}.expert_count"][1] == s.experts
    assert lay.kv[f"{a}.expert_used_count"][1] == s.k and lay.kv[f"{a}.embedding_length"][1] == s.hidden
    assert len(lay.kv["tokenizer.ggml.tokens"][1]) == s.n_vocab
    assert "synthetic" in lay.kv["general.description"][1]
    # a LExI ladder from the allocator, full k first
    info = model_info(path)
    assert info.moe_layers == s.moe_layers
    rows = read_ladder(info)
    assert [r["budget"] for r in rows][0] == 1.0 and len(rows) >= 2
    assert lay.kv[keys.EXPERT_USED_COUNT][1] == info.base_counts
    # real bytes: not sparse, no zero pages in the experts
    st = os.stat(path)
    assert st.st_blocks * 512 >= st.st_size * 0.99
    rng = np.random.default_rng(0)
    with open(path, "rb") as f:
        for t in (t for t in lay.tensors if "_exps.weight" in t.name):
            for at in rng.integers(t.offset, t.offset + t.nbytes - 4096, 8):
                f.seek(int(at) // 4096 * 4096)
                assert any(f.read(4096)), f"a zero page in {t.name}"
    # loads in the runtime and decodes finite logits
    for lg in decode(path):
        assert lg.shape == (s.n_vocab,) and np.isfinite(lg).all() and lg.std() > 0.1
    path.unlink()                          # ~1 GB each: not kept in pytest's last three tmp folders


def test_sizes_of_the_full_shapes():
    """The quant mixes reproduce the released files' sizes (their download pages, in GB)."""
    size = {n: sum(S.nbytes(ne, ty) for _, ne, _, ty in S.layout(S.get(n), q)) / 1e9
            for n, q in (("qwen3-30b-a3b", "Q4_K_M"), ("deepseek-v2-lite", "Q4_K_M"), ("olmoe-1b-7b", "Q4_K_M"),
                         ("gpt-oss-20b", "MXFP4"))}
    assert abs(size["qwen3-30b-a3b"] - 18.6) < 0.2 and abs(size["deepseek-v2-lite"] - 10.4) < 0.2
    assert abs(size["olmoe-1b-7b"] - 4.21) < 0.1 and abs(size["gpt-oss-20b"] - 12.1) < 0.1
    # Q4_K_M: Q6_K in ffn_down where use_more_bits says, Q8_0 attn_k / attn_v on 8-expert models
    types = {n: ty for n, _, _, ty in S.layout(S.get("mixtral-8x7b"), "Q4_K_M")}
    assert types["blk.0.ffn_down_exps.weight"] == "Q6_K" and types["blk.4.ffn_down_exps.weight"] == "Q4_K"
    assert types["blk.3.attn_v.weight"] == types["blk.3.attn_k.weight"] == "Q8_0"
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"


def test_cli_caches_and_refuses_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LEXI_GGUF_CACHE", str(tmp_path / "cache"))
    args = ["synth", "--like", "olmoe-1b-7b", "--layers", "1", "--experts", "8", "--quant", "Q4_K_M"]
    assert cli.main([*args, "-o", str(tmp_path / "a.gguf")]) == 0
    assert "written in" in capsys.readouterr().out
    assert cli.main([*args, "-o", str(tmp_path / "b.gguf")]) == 0
    assert "from the cache" in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "synth").glob("*.gguf"))) == 1
    # --config: the same fields as JSON
    cfg = tmp_path / "shape.json"
    cfg.write_text(json.dumps({**asdict(S.reduced(S.get("olmoe-1b-7b"), 1, 8)), "name": "mine", "extra": []}))
    assert cli.main(["synth", "--config", str(cfg), "-o", str(tmp_path / "c.gguf")]) == 0
    capsys.readouterr()
    for bad, msg in ((["--like", "nope"], "no released shape named 'nope'"),
                     (["--like", "olmoe-1b-7b", "--quant", "MXFP4"], "not released in MXFP4"),
                     (["--like", "olmoe-1b-7b", "--quant", "Q2_K"], "synth writes Q4_K_M, Q8_0"),
                     (["--like", "olmoe-1b-7b", "--layers", "99"], "--layers 99: olmoe-1b-7b has 16 layers"),
                     ([], "give exactly one of --like")):
        assert cli.main(["synth", *bad, "-o", str(tmp_path / "x.gguf")]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err
    for p in (*tmp_path.glob("*.gguf"), *(tmp_path / "cache" / "synth").glob("*.gguf")):
        p.unlink()
    with pytest.raises(LexiError, match="unknown field"):
        cfg.write_text(json.dumps({"name": "x", "colour": 1}))
        S.from_config(cfg)
