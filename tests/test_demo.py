"""`make demo` survives a stage that dies: the cause is named, later stages that need it are skipped,
the others still run, the summary is still written, and the exit status is non-zero."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


def test_demo_reports_a_crashed_stage(tmp_path):
    env = {**os.environ, "LEXI_DEMO_OUT": str(tmp_path), "LEXI_DEMO_CRASH": "model"}
    r = subprocess.run([sys.executable, DEMO], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "model: killed by SIGSEGV (signal 11)" in r.stderr
    for later in ("convert", "chat", "bench", "eval", "caching"):
        assert f"{later}: skipped: needs" in r.stderr
    assert "== summary" in r.stdout
    assert "FAILED model: killed by SIGSEGV" in (tmp_path / "summary.md").read_text()


def test_a_stage_that_does_not_need_the_failed_one_still_runs(capsys):
    spec = importlib.util.spec_from_file_location("demo_script", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    ran = []

    def run(name):
        ran.append(name)
        return "killed by SIGSEGV (signal 11)" if name == "chat" else None

    failed, seconds = demo.run_stages(demo.STAGES, run)
    # every stage's needs are satisfied but chat's crash; nothing needs chat, so all the rest ran
    assert ran == [s[0] for s in demo.STAGES]
    assert failed == {"chat": "killed by SIGSEGV (signal 11)"} and set(seconds) == set(ran)
    failed, _ = demo.run_stages(demo.STAGES, lambda name: "exit status 1" if name == "convert" else None)
    assert failed["convert"] == "exit status 1"
    assert {n for n, c in failed.items() if c.startswith("skipped: needs convert")} == {"chat", "bench", "eval", "caching"}
