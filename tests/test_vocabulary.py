"""One vocabulary across commands: every option of every sub-command of `lexi-gguf` (walked from
lexi_gguf.cli.build_parser(), nested ones included) means the same and takes the same type wherever it
is spelt the same, and is in CONTRIBUTING.md's option table with that type; the table lists nothing no
command has. Old spellings stay accepted and hidden. Parsing only: nothing is loaded or run."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from lexi_gguf.cli import build_parser
from lexi_gguf.cli.common import budget, prefetch_modes, type_name

ROOT = Path(__file__).resolve().parent.parent


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, action) for every option of every (sub-)command."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from walk(sub, (*path, name))
        elif a.option_strings and not isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
            yield path, a


def canonical(a: argparse.Action) -> str:
    return max(a.option_strings, key=len)


def signature(a: argparse.Action) -> tuple:
    return type_name(a), a.dest, tuple(sorted(a.option_strings))


def options() -> dict[str, dict[tuple, list[str]]]:
    """option -> {signature: [commands]} for every visible option."""
    out: dict[str, dict[tuple, list[str]]] = {}
    for path, a in walk(build_parser()):
        if a.help == argparse.SUPPRESS:
            continue
        out.setdefault(canonical(a), {}).setdefault(signature(a), []).append(" ".join(path))
    return out


def table() -> dict[str, tuple[str, str]]:
    """CONTRIBUTING.md's option table: canonical option -> (meaning, type)."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    section = text.split("## Options", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*((?:`-[^`]+`(?:,\s*)?)+)\s*\|(.*)\|(.*)\|\s*$", line)
        if m:
            names = re.findall(r"`(-[^`]+)`", m.group(1))
            rows[max(names, key=len)] = (m.group(2).strip(), m.group(3).strip())
    return rows


def test_an_option_means_the_same_on_every_command():
    differ = {opt: {f"{sig}": cmds for sig, cmds in sigs.items()} for opt, sigs in options().items() if len(sigs) > 1}
    assert not differ, f"options spelt alike that take different types, aliases or destinations: {differ}"


def test_every_option_is_in_the_contributing_table_with_its_type():
    rows = table()
    assert len(rows) > 50, "CONTRIBUTING.md's option table was not found"
    missing, wrong = [], []
    for opt, sigs in options().items():
        (typ, _, _), cmds = next(iter(sigs.items()))
        if opt not in rows:
            missing.append(f"{opt} ({typ}; {', '.join(cmds)})")
        elif rows[opt][1] != typ:
            wrong.append(f"{opt}: table says {rows[opt][1]!r}, the parser takes {typ!r}")
        elif not rows[opt][0]:
            wrong.append(f"{opt}: no meaning in the table")
    assert not missing, "options missing from CONTRIBUTING.md's table:\n" + "\n".join(missing)
    assert not wrong, "\n".join(wrong)


def test_the_table_lists_only_options_some_command_has():
    stale = sorted(set(table()) - set(options()))
    assert not stale, f"CONTRIBUTING.md lists options no command has: {stale}"


def test_old_spellings_are_accepted_and_hidden():
    p = build_parser()
    hidden = [(path, a) for path, a in walk(p) if a.help == argparse.SUPPRESS]
    for path, a in hidden:    # a hidden alias writes the same destination as a visible option of its command
        visible = [b for q, b in walk(p) if q == path and b.help != argparse.SUPPRESS and b.dest == a.dest]
        assert visible, f"{' '.join(path)} {a.option_strings}: a hidden option with no visible one beside it"
    args = p.parse_args(["trace", "m.gguf", "--prompts", "p.txt", "--max-new-tokens", "8", "-o", "t.npz"])
    assert (args.trace_cmd, args.model, args.max_tokens) == ("run", "m.gguf", 8)
    assert p.parse_args(["trace", "run", "m.gguf", "-o", "t.npz"]).max_tokens == 32
    assert p.parse_args(["trace-import", "r.csv", "--n-expert", "4", "-o", "t.npz"]).func.__name__ == "cmd_trace_import"
    assert "trace-import" not in p.format_help()
    assert p.parse_args(["inspect", "m.gguf", "--json"]).json == "-"      # the old flag: JSON on stdout


def test_trace_import_is_a_real_subcommand():
    p = build_parser()
    args = p.parse_args(["trace", "import", "r.csv", "--n-expert", "4", "-o", "t.npz"])
    assert (args.trace_cmd, args.csv, args.func.__name__) == ("import", "r.csv", "cmd_trace_import")
    trace = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices["trace"]
    sub = next(a for a in trace._actions if isinstance(a, argparse._SubParsersAction))
    assert set(dict(sub.choices)) == {"run", "import"}
    # a model that happens to be called `run` or `import` needs the explicit form
    assert p.parse_args(["trace", "run", "import", "-o", "t.npz"]).model == "import"


@pytest.mark.parametrize("cmd", [["inspect", "m.gguf"], ["bench", "m.gguf"], ["eval", "m.gguf", "--text", "t.txt"],
                                 ["predictor", "eval", "t.npz"], ["cache-sim", "t.npz"]])
def test_json_is_a_path_everywhere_dash_or_nothing_is_stdout(cmd):
    p = build_parser()
    assert p.parse_args([*cmd, "--json", "out.json"]).json == "out.json"
    assert p.parse_args([*cmd, "--json", "-"]).json == "-"
    assert p.parse_args([*cmd, "--json"]).json == "-"
    assert p.parse_args(cmd).json is None


def test_budget_and_prefetch_types():
    assert budget("0.5") == 0.5 and budget(" FULL ") == "full" and budget("default") == "default"
    for bad in ("0", "1.5", "-0.2", "half"):
        with pytest.raises(argparse.ArgumentTypeError):
            budget(bad)
    assert prefetch_modes("off,chosen") == ["off", "chosen"]
    with pytest.raises(argparse.ArgumentTypeError):
        prefetch_modes("sometimes")
    p = build_parser()
    for cmd in (["chat", "m.gguf"], ["serve", "m.gguf"], ["trace", "run", "m.gguf", "-o", "t.npz"]):
        assert p.parse_args([*cmd, "--budget", "0.75"]).budget == 0.75
        assert p.parse_args([*cmd, "--budget", "full"]).budget == "full"
