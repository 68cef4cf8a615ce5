"""Native code in child processes: a crash (SIGSEGV, SIGILL, abort) becomes an error that names the
signal and keeps the child's last words, instead of taking the caller down with it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .. import LexiError


def exit_cause(returncode: int) -> str:
    """'exit status 2' or 'killed by SIGSEGV (signal 11)' for a subprocess return code."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name} (signal {-returncode})"
    return f"exit status {returncode}"


class ChildFailed(LexiError):
    def __init__(self, what: str, returncode: int, output: str):
        self.returncode = returncode
        self.cause = exit_cause(returncode)
        self.output = output
        tail = "\n".join(output.strip().splitlines()[-12:])
        super().__init__(f"{what} failed: {self.cause}" + (f"\n{tail}" if tail else ""))


def run_child(cmd: list, what: str, *, timeout: float | None = None, cwd: str | Path | None = None,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Run cmd, capture its output; any non-zero exit or signal raises ChildFailed naming the cause."""
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    if r.returncode != 0:
        raise ChildFailed(what, r.returncode, (r.stdout or "") + (r.stderr or ""))
    return r


def package_env(extra: dict | None = None) -> dict:
    """This environment with this checkout's package root first on PYTHONPATH, so that `python -m
    lexi_gguf....` in a child runs the same code as its parent; plus `extra`."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def stream_module(module: str, args: list, what: str, *, log=print, env: dict | None = None) -> None:
    """Run `python -m module args` in a child, each line it prints passed to log as it comes; a failure
    or a signal raises ChildFailed naming the cause with the child's last lines."""
    p = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env or package_env())
    lines = []
    for line in p.stdout:
        lines.append(line)
        del lines[:-50]
        log(line.rstrip("\n"))
    if p.wait() != 0:
        raise ChildFailed(what, p.returncode, "".join(lines))
