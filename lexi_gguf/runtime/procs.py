"""Native code in child processes: a crash (SIGSEGV, SIGILL, abort) becomes an error that names the
signal and keeps the child's last words, instead of taking the caller down with it."""
from __future__ import annotations

import signal
import subprocess
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
