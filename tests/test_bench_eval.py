"""bench and eval: the promised rows and JSON fields; the full model against itself is KLD 0 and
same-top-1 1.0; a budget the file does not store is refused."""
from __future__ import annotations

import json

import pytest

from lexi_gguf import LexiError, cli
from lexi_gguf.measure.bench import bench
from lexi_gguf.measure.evaluate import evaluate


def test_bench_rows_and_outputs(converted, tmp_path, capsys):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    assert cli.main(["bench", str(converted), "--budgets", "0.75,0.5", "--n-prompt", "64", "--n-gen", "8",
                     "--reps", "2", "--threads", "2", "--json", str(js), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| config | budget | avg k | backend | threads | pp64 t/s | tg8 t/s |" in out
    res = json.loads(js.read_text())
    assert [(r["config"], r["budget"]) for r in res["rows"]] == [
        ("full", 1.0), ("uniform", 0.75), ("lexi", 0.75), ("uniform", 0.5), ("lexi", 0.5)]
    for r in res["rows"]:
        assert r["pp_min"] <= r["pp_tps"] <= r["pp_max"] and r["tg_min"] <= r["tg_tps"] <= r["tg_max"]
        assert r["tg_tps"] > 0 and r["ideal_speedup"] >= 1.0
    lexi75 = res["rows"][2]
    assert lexi75["avg_k"] == pytest.approx(3.0) and sum(lexi75["expert_used_count"]) == 12
    # 0.75 x base k 4 = 3 per layer exactly; 0.5 -> 2
    assert res["rows"][1]["expert_used_count"] == [3, 3, 3, 3]
    assert res["backend"] == "CPU" and res["machine"]["cores"] >= 1
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
        assert r["kld_mean"] > 0 and 0 <= r["same_top1"] <= 1 and r["kld_p99"] >= r["kld_mean"] * 0.5
        assert set(r) >= {"config", "budget", "avg_k", "ppl", "kld_mean", "kld_p99", "same_top1"}


def test_budget_not_stored_is_refused(converted, capsys):
    with pytest.raises(LexiError, match=r"budget 0.3 is not stored .*stored budgets: 1, 0.875, 0.75, 0.625, 0.5"):
        bench(converted, [0.3], progress=False)
    assert cli.main(["eval", str(converted), "--text", __file__, "--budgets", "0.3"]) == 2
    assert "budget 0.3 is not stored" in capsys.readouterr().err
