"""docs/results.md is generated from bench/results/*.json (`lexi-gguf report`) and current; every results
file shows up stamped with where and on what it ran; a family with no renderer (e.g. a mutation campaign)
still shows up readably; and the benches' shared saving (bench/_common.py) names files by machine id,
records provenance, carries no machine path and refuses to overwrite a tracked file from a dirty tree.
No model is loaded."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lexi_gguf import cli
from lexi_gguf.measure import report
from lexi_gguf.measure.report.markdown import NR

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))    # the checkout root: bench/ helpers
from bench import _common as C  # noqa: E402

MUTATION = {"kind": "mutation", "machine": {"cpu": "Test CPU", "cpu_class": "avx2", "cores": 4,
                                                     "id": "test-cpu-avx2-4c-abcdef"},
            "date": "2026-01-02T03:04:05+00:00", "commit": "0123456789ab", "cases": 120, "runs": 360,
            "commands": ["inspect", "apply", "chat"],
            "by_command": {"inspect": {"clean error": 100, "crash": 2}, "apply": {"clean error": 118, "ok": 2}},
            "by_mutation": {"truncate": {"clean error": 80}, "bitflip": {"clean error": 38, "crash": 2}},
            "failures": [{"command": "inspect", "mutation": "bitflip", "outcome": "crash", "signal": 11}]}


def test_docs_results_is_what_the_report_makes():
    assert report.render(RESULTS, ROOT / "docs") == (ROOT / "docs" / "results.md").read_text(), \
        "docs/results.md is stale: run `make report` (lexi-gguf report) and commit it"


def test_every_results_file_is_rendered_and_stamped():
    text = report.render(RESULTS, ROOT / "docs")
    for p in sorted(RESULTS.glob("*.json")):
        assert f"### {p.stem}\n" in text, p.name
        kind, _ = report.family_of(p, json.loads(p.read_text()))
        assert kind in report.RENDERERS, f"{p.name}: family {kind!r} has no renderer"
    assert "could not read this file" not in text
    blocks = text.split("\n### ")[1:]
    assert blocks and all("Ran on: CPU" in b and "llama.cpp" in b and "patch hash" in b for b in blocks)
    assert f"date {NR}" in text       # the files saved before results carried provenance say so


@pytest.mark.parametrize("name,kind,variant", [
    ("runtime-x86_64-2c.json", "runtime", None),
    ("memlimit-widened-q4km-ra128-x86_64-avx2-2c.json", "memlimit", "widened-q4km-ra128"),
    ("idpredict-qwen3-testbed-x86_64-avx2-2c.json", "idpredict", "qwen3-testbed"),
    ("serve-load-x86_64-avx2-2c.json", "serve-load", None),
    ("repack-Q4_K_M-x86_64-avx2-2c.json", "repack", "Q4_K_M"),
    ("runtime-amd-epyc-avx2-2c-3f09a1.json", "runtime", None),
    ("memlimit-widened-amd-epyc-7b13-avx512-16c-00ff00.json", "memlimit", None),   # the JSON says the variant
    ("brand-new-thing-amx-8c-123456.json", "brand-new-thing", None)])
def test_family_from_old_and_new_file_names(name, kind, variant):
    assert report.family_of(Path(name), {}) == (kind, variant)
    assert report.family_of(Path(name), {"kind": "k", "variant": "v"}) == ("k", "v")   # the JSON's own word wins


def test_a_family_without_a_renderer_still_shows_up(tmp_path, monkeypatch):
    (tmp_path / "mutation-test-cpu-avx2-4c-abcdef.json").write_text(json.dumps(MUTATION))
    other = {"kind": "something-new", "score": 0.5, "rows": [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}],
             "nested": {"deep": {"deeper": {"x": 1}}}}
    (tmp_path / "something-new-x86_64-2c.json").write_text(json.dumps(other))
    text = report.render(tmp_path, tmp_path)
    assert "## Mutation campaign" in text and "## something-new" in text
    assert "| `inspect` | 100 | 2 | 0 | 102 |" in text              # dedicated: outcomes by command, totals
    assert "| `bitflip` | 38 | 2 | 40 |" in text
    assert "CPU `Test CPU` · class `avx2` · 4 cores · date `2026-01-02T03:04:05+00:00` · commit `0123456789ab`" in text
    assert f"patch hash {NR}" in text
    assert "| 2 | y |" in text and "`score` | 0.5" in text and "`nested` (1 entries)" in text
    monkeypatch.delitem(report.RENDERERS, "mutation")  # the generic view of the same file
    text = report.render(tmp_path, tmp_path)
    assert "No renderer for this family yet" in text
    assert "| `inspect` | 100 | 2 | 0 | 102 |" in text and "| `bitflip` | 38 | 2 | 40 |" in text
    assert "`cases` | 120" in text and "inspect, apply, chat" in text and "bitflip" in text


def test_a_renderer_that_cannot_read_a_file_falls_back(tmp_path):
    (tmp_path / "runtime-x86_64-2c.json").write_text(json.dumps({"model": "m", "rows": [{"nope": 1}]}))
    text = report.render(tmp_path, tmp_path)
    assert "the runtime renderer could not read this file: KeyError" in text and "| nope |" in text


def test_report_command_writes_checks_and_prints(tmp_path, capsys):
    (tmp_path / "mutation-x.json").write_text(json.dumps(MUTATION))
    out = tmp_path / "results.md"
    assert cli.main(["report", "--results", str(tmp_path), "-o", str(out)]) == 0
    assert cli.main(["report", "--results", str(tmp_path), "-o", str(out), "--check"]) == 0
    out.write_text(out.read_text() + "hand edit\n")
    assert cli.main(["report", "--results", str(tmp_path), "-o", str(out), "--check"]) == 2
    assert "run `make report`" in capsys.readouterr().err
    assert cli.main(["report", "--results", str(tmp_path), "-o", "-"]) == 0
    assert capsys.readouterr().out.startswith("# Results")


# --------------------------------------------------------------------------------------------------
# bench/_common.py: how every bench saves

def _args(tmp_path, **kw):
    return SimpleNamespace(quick=False, force=False, results=str(tmp_path), **kw)


def test_results_are_named_by_machine_id_and_carry_provenance_without_paths(tmp_path):
    from lexi_gguf.runtime.cpu import machine_id
    run = C.Run(_args(tmp_path), "runtime", "olmoe-shaped")
    assert run.json == tmp_path / f"runtime-olmoe-shaped-{machine_id()}.json"
    res = {"model": str(ROOT / "out" / "bench" / "m.gguf"), "cache": str(Path.home() / ".cache" / "x" / "y.gguf"),
           "log": f"wrote {tmp_path / 'a.json'} ok", "rows": [{"path": str(tmp_path / "b.npz")}],
           "targets_met": {"fast": True}}
    saved = json.loads(run.save(res).read_text())
    for key in ("kind", "variant", "date", "commit", "dirty", "patch_hash", "llama_cpp_commit", "machine"):
        assert key in saved, key
    assert (saved["kind"], saved["variant"]) == ("runtime", "olmoe-shaped")
    assert saved["machine"]["id"] == machine_id() and saved["machine"]["cpu"]
    assert saved["llama_cpp_commit"] and saved["patch_hash"] and saved["commit"]
    text = json.dumps(saved)
    for p in (str(ROOT), str(Path.home()), str(tmp_path)):
        assert p not in text, p
    assert saved["model"] == "out/bench/m.gguf" and saved["cache"] == "y.gguf"
    assert saved["log"] == "wrote a.json ok" and saved["rows"][0]["path"] == "b.npz"
    assert report.family_of(run.json, saved) == ("runtime", "olmoe-shaped")


def test_a_tracked_results_file_is_not_overwritten_from_a_dirty_checkout(tmp_path, monkeypatch):
    target = C.result_path("runtime", None, tmp_path)
    target.write_text("{}")
    monkeypatch.setattr(C, "tracked", lambda p: True)
    monkeypatch.setattr(C, "dirty", lambda: True)
    with pytest.raises(SystemExit, match="uncommitted changes"):
        C.Run(_args(tmp_path), "runtime")
    assert target.read_text() == "{}"
    forced = C.Run(SimpleNamespace(quick=False, force=True, results=str(tmp_path)), "runtime")
    assert forced.json == target
    monkeypatch.setattr(C, "dirty", lambda: False)          # a clean checkout may overwrite: git has the old one
    C.Run(_args(tmp_path), "runtime")


def test_quick_runs_never_write_bench_results():
    run = C.Run(SimpleNamespace(quick=True, force=False, results=None), "runtime")
    assert run.json.parent == C.QUICK_RESULTS and C.RESULTS not in run.json.parents
