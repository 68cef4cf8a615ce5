"""bench and eval: the promised rows and JSON fields; the full model against itself is KLD 0 and
same-top-1 1.0; a budget the file does not store is refused."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lexi_gguf import LexiError, cli
from lexi_gguf.gguf.reader import open_reader
from lexi_gguf.measure.bench import bench
from lexi_gguf.measure.evaluate import evaluate
from lexi_gguf.runtime.llama import lexi_overrides, load
from lexi_gguf.runtime.scoring import chunk_logprobs, text_chunks, token_kld


def _tensor_bytes(path) -> tuple[float, list[float]]:
    """(bytes every token reads, one expert's bytes per block), straight from the tensor table."""
    r = open_reader(path)
    n_expert = int(r.fields["olmoe.expert_count"].contents())
    fixed, expert = 0.0, {}
    for t in r.tensors:
        parts = t.name.split(".")
        if t.name.startswith("token_embd"):
            fixed += int(t.n_bytes) / int(t.shape[-1])
        elif parts[0] == "blk" and parts[2].endswith("_exps"):
            expert[int(parts[1])] = expert.get(int(parts[1]), 0.0) + int(t.n_bytes) / n_expert
        else:
            fixed += int(t.n_bytes)
    return fixed, [expert[i] for i in sorted(expert)]


def _logprobs(path, text, ctx, n, no_lexi=False):
    llm = load(path, kv_overrides=lexi_overrides(lexi=not no_lexi) or None, n_ctx=ctx, n_batch=ctx, logits_all=True,
               n_threads=2)
    out = [chunk_logprobs(llm, c) for c in text_chunks(llm, text, ctx)[:n]]
    llm.close()
    return out


def test_bench_rows_and_outputs(converted, tmp_path, capsys):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    assert cli.main(["bench", str(converted), "--budgets", "0.75,0.5", "--n-prompt", "64", "--n-gen", "8",
                     "--reps", "2", "--threads", "2", "--json", str(js), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| config | budget | avg k | backend | threads | pp64 t/s | tg8 t/s |" in out
    res = json.loads(js.read_text())
    assert [(r["config"], r["budget"]) for r in res["rows"]] == [
        ("full", 1.0), ("uniform", 0.75), ("lexi", 0.75), ("uniform", 0.5), ("lexi", 0.5)]
    # the active-bytes bound, from the file's own tensor sizes: fixed bytes F (one embedding row) and one
    # expert's bytes E per MoE layer, so a row at counts k runs (F + sum 4 E) / (F + sum k E) faster
    fixed, expert = _tensor_bytes(converted)
    for r in res["rows"]:
        want = (fixed + sum(4 * e for e in expert)) / (fixed + sum(k * e for k, e in zip(r["expert_used_count"], expert)))
        assert r["ideal_speedup"] == pytest.approx(want, rel=1e-9), r["config"]
        assert r["tg_speedup"] == pytest.approx(r["tg_tps"] / res["rows"][0]["tg_tps"])
    lexi75 = res["rows"][2]
    assert lexi75["avg_k"] == pytest.approx(3.0) and sum(lexi75["expert_used_count"]) == 12
    # 0.75 x base k 4 = 3 per layer exactly; 0.5 -> 2
    assert res["rows"][1]["expert_used_count"] == [3, 3, 3, 3]
    assert res["backend"] == "CPU" and res["machine"]["cores"] == os.cpu_count()
    assert png.stat().st_size > 1000


def test_uniform_uses_nearest_whole_k_and_reports_it(converted):
    res = bench(converted, [0.875], n_prompt=32, n_gen=4, reps=1, threads=2, progress=False)
    uni = res["rows"][1]
    assert uni["config"] == "uniform" and uni["avg_k"] in (3.0, 4.0)   # 3.5 is no whole k: nearest, reported
    assert uni["expert_used_count"] == [int(uni["avg_k"])] * 4


def test_eval_full_against_itself_and_rows(converted, tmp_path):
    text = " ".join(f"token {i} of the evaluation text, number {i * 7 % 13}." for i in range(400))
    res = evaluate(converted, text, [0.5], ctx=64, threads=2, max_chunks=4, progress=False)
    assert [(r["config"], r["budget"]) for r in res["rows"]] == [("full", 1.0), ("uniform", 0.5), ("lexi", 0.5)]
    full = res["rows"][0]
    assert full["kld_mean"] == pytest.approx(0.0, abs=1e-6) and full["same_top1"] == 1.0
    for r in res["rows"][1:]:
        assert set(r) >= {"config", "budget", "avg_k", "ppl", "kld_mean", "kld_p99", "same_top1"}
    # the lexi row's KLD by another route: eval picks the ladder row (lexi.budget_index override); here a
    # copy stores that row's counts as its own (apply --k) and both files are scored chunk by chunk
    lexi = res["rows"][2]
    copy = tmp_path / "lexi-row.gguf"
    assert cli.main(["apply", str(converted), "-o", str(copy), "--k", ",".join(map(str, lexi["expert_used_count"]))]) == 0
    ref, got = _logprobs(converted, text, 64, 4, no_lexi=True), _logprobs(copy, text, 64, 4)
    kld = float(np.mean([token_kld(a, b).mean() for a, b in zip(ref, got)]))
    assert lexi["kld_mean"] == pytest.approx(kld, rel=1e-4) and kld > 1e-4   # fewer experts do change the output


def test_eval_runs_any_counts_given_with_k(converted, tmp_path, capsys):
    """eval --k: counts no ladder row stores, set on the loaded model; the same counts as the stored 0.5 row
    score the same, others differently; counts that do not fit are refused in one line."""
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"token {i} of the evaluation text, number {i * 7 % 13}." for i in range(400)))
    base = evaluate(converted, text.read_text(), [0.5], ctx=64, threads=2, max_chunks=2, progress=False)
    lexi = base["rows"][2]["expert_used_count"]
    js = tmp_path / "e.json"
    assert cli.main(["eval", str(converted), "--text", str(text), "--budgets", "0.5", "--ctx", "64", "--chunks", "2",
                     "--threads", "2", "--k", ",".join(map(str, lexi)), "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["rows"]
    assert rows[-1]["config"] == "custom" and rows[-1]["expert_used_count"] == lexi
    assert rows[-1]["kld_mean"] == pytest.approx(rows[2]["kld_mean"], rel=1e-5) and rows[-1]["kld_mean"] > 1e-4
    other = [4, 1, 1, 4] if lexi != [4, 1, 1, 4] else [1, 4, 4, 1]
    res = evaluate(converted, text.read_text(), [0.5], ctx=64, threads=2, max_chunks=2, progress=False, custom=other)
    assert res["rows"][-1]["avg_k"] == 2.5 and res["rows"][-1]["kld_mean"] != pytest.approx(rows[2]["kld_mean"], rel=1e-3)
    capsys.readouterr()
    assert cli.main(["eval", str(converted), "--text", str(text), "--k", "1,9,2,2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "9" in err and len(err.splitlines()) == 1


def test_budget_not_stored_is_refused(converted, capsys):
    with pytest.raises(LexiError, match=r"budget 0.3 is not stored .*stored budgets: 1, 0.875, 0.75, 0.625, 0.5"):
        bench(converted, [0.3], progress=False)
    assert cli.main(["eval", str(converted), "--text", __file__, "--budgets", "0.3"]) == 2
    assert "budget 0.3 is not stored" in capsys.readouterr().err
