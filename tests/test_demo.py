"""`make demo` survives a stage that dies: the cause is named, later stages that need it are skipped,
the others still run, the summary is still written, and the exit status is non-zero. Its chat stage
continues a held-out passage with sampled, varied tokens (not one token repeated) and says what the
model is."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"


def _demo():
    spec = importlib.util.spec_from_file_location("demo_script", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


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
    demo = _demo()
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


PASSAGE = ("Comparisons\n***********\n\nShort line.\n\n"
           "Unlike C, all comparison operations in Python have the same priority,\nwhich is lower than that of "
           "any arithmetic, shifting or bitwise\noperation.  Also unlike C, expressions like \"a < b < c\" have "
           "the interpretation that is conventional in mathematics.")


def test_degenerate_continuations_are_told_apart():
    from lexi_gguf.serve.chat import degenerate
    assert degenerate([7] * 48)                                  # `| | | | ...`
    assert degenerate([7, 8] * 24)                               # one of two tokens is half of it
    assert degenerate([5, 6, 7] * 16)                            # `_ If the_ If the ...`: a loop of three
    assert not degenerate(list(range(40)) + [3, 3, 5, 7, 9, 11, 3, 2])


def test_chat_stage_continues_a_held_out_passage_with_varied_tokens(laddered_gguf, capsys):
    demo = _demo()
    prompt, original = demo.held_out_prompt(PASSAGE)
    # the first paragraph of prose, whitespace collapsed as the tokenizer did to the training text
    assert prompt == "Unlike C, all comparison operations in Python have the same priority, which is lower than that"
    assert original.startswith("of any arithmetic, shifting or bitwise operation.")
    recipe = {"arch": "qwen3_moe", "layers": 4, "experts": 8, "k": 4, "vocab": 50257, "steps": 2, "seconds": 3.0}
    out = demo.chat_demo(laddered_gguf, prompt, original, recipe, budget=0.5)
    from lexi_gguf.serve.chat import degenerate
    assert len(out["tokens"]) >= 16 and not degenerate(out["tokens"]), out["text"]
    assert out["budget"] == "0.5" and out["sampling"]["temperature"] > 0
    printed = capsys.readouterr().out
    assert f"the model: a {out['n_params'] / 1e6:.1f} M-parameter qwen3_moe MoE testbed" in printed
    assert f"prompt (the start of a held-out passage): {prompt}" in printed and out["text"] in printed
