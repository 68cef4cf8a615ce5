"""Switching the budget of a loaded model (llama_lexi_set_row): after a switch in either direction,
mid-conversation, the logits equal a fresh load at that budget fed the same history; llama.cpp's
graph reuse cannot keep the old k; `chat` switches with /budget."""
from __future__ import annotations

import io

import numpy as np
import pytest

from lexi_gguf import LexiError
from lexi_gguf.runtime import llama as runtime
from lexi_gguf.serve.chat import chat

from conftest import LADDER, LADDER_DEFAULT

GGML_TYPE_F32 = 0
HIST1 = [464, 2068, 7586, 21831, 18045, 625, 262, 16931]
HIST2 = [3290, 13, 198, 1212, 318, 257]


def _load(path, **kv):
    return runtime.load(path, kv_overrides=kv or None, n_ctx=64, logits_all=True, n_threads=2,
                        type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)


def _logits(llm, tokens):
    llm.eval(tokens)
    return np.array(llm.scores[: llm.n_tokens], dtype=np.float32)


def _fresh(path, tokens, **kv):
    llm = _load(path, **kv)
    out = _logits(llm, tokens)
    llm.close()
    return out


def test_switch_equals_fresh_load_both_directions(laddered_gguf):
    path = laddered_gguf
    llm = _load(path)
    assert runtime.lexi_n_rows(llm) == len(LADDER)
    assert runtime.lexi_row(llm) == runtime.ROW_LOADED
    _logits(llm, HIST1)                                      # part of a conversation at the default
    # down to the smallest budget, up to the model's own k, back to the default, to a middle row
    for row, kv in ((2, {"lexi.budget_index": 2}), (runtime.ROW_MODEL, {"lexi.enable": False}),
                    (runtime.ROW_LOADED, {}), (1, {"lexi.budget_index": 1})):
        runtime.set_lexi_row(llm, row)
        assert runtime.lexi_row(llm) == row and llm.n_tokens == 0      # history dropped: re-read at new k
        got = _logits(llm, HIST1 + HIST2)
        ref = _fresh(path, HIST1 + HIST2, **kv)
        assert np.abs(got - ref).max() <= 1e-4, row
        assert (got.argmax(-1) == ref.argmax(-1)).all()
    llm.close()


def test_graph_reuse_does_not_keep_the_old_k(laddered_gguf):
    # the same one-token batch before and after a switch has the same shape: a reused graph would
    # silently run the old counts
    llm = _load(laddered_gguf)
    runtime.set_lexi_row(llm, 0)
    a = _logits(llm, [464])
    runtime.set_lexi_row(llm, 2)
    b = _logits(llm, [464])
    llm.close()
    assert np.abs(b - _fresh(laddered_gguf, [464], **{"lexi.budget_index": 2})).max() <= 1e-5
    assert np.abs(a - b).max() > 1e-3     # the rows really differ


def test_keep_cache_and_bad_rows(laddered_gguf):
    llm = _load(laddered_gguf)
    _logits(llm, HIST1)
    runtime.set_lexi_row(llm, 1, keep_cache=True)          # the documented approximation: history kept
    assert llm.n_tokens == len(HIST1) and runtime.lexi_row(llm) == 1
    for bad in (len(LADDER), 99, -3):
        with pytest.raises(LexiError, match=f"ladder row {bad} does not exist: the model stores 3 rows"):
            runtime.set_lexi_row(llm, bad)
    assert runtime.lexi_row(llm) == 1
    llm.close()


def test_chat_budget_command(laddered_gguf):
    out = io.StringIO()
    chat(laddered_gguf, threads=2, n_ctx=64, max_tokens=4, temperature=0.0,
         stdin=io.StringIO("/budget\n/budget 0.5\n/budget 0.3\n/budget full\n/budget default\n"), stdout=out)
    text = out.getvalue()
    assert f"[budget default: k per layer {LADDER_DEFAULT}" in text
    assert f"[budget 0.5: k per layer {LADDER[0.5]}" in text
    assert "budget 0.3 is not stored" in text and "stored budgets: 1, 0.625, 0.5" in text
    assert "[budget full: k per layer [4, 4, 4, 4]" in text
    assert text.count("[budget default:") == 2


def test_bench_switch(laddered_gguf, tmp_path, capsys):
    import json

    from lexi_gguf import cli
    out = tmp_path / "switch.json"
    assert cli.main(["bench", str(laddered_gguf), "--switch", "--budgets", "0.5", "--n-gen", "8",
                     "--threads", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["budget"] for r in res["rows"]] == ["full", "0.5"]
    assert res["rows"][1]["expert_used_count"] == LADDER[0.5]
    assert res["switched"] == ["full", "0.5"] and res["switches"] == 20
    assert "switch full <-> 0.5 (median of 20)" in capsys.readouterr().out
