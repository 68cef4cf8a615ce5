"""The mutation campaign: the damaged files of lexi_gguf.testbeds.mutate taken through the CLI as users run
it (inspect, apply, relayout, chat, serve, bench, trace), one worker process at a time
(`python -m bench.mutations worker`); a worker that dies (a signal, a C++ abort) or hangs is recorded and
replaced. The outcome of one run is one of:
  ok        exit 0 (and any file it wrote is a sound GGUF whose lexi keys pass)
  refused   exit 2 with a one-line `lexi-gguf: error:` and nothing left behind
and every other outcome is a failure: traceback, signal, hang, left-output (a refusal that left a file),
bad-output (exit 0 with a file that fails the checks), accepted (exit 0 on a case whose lexi keys are
damaged, by a command that reads them). Used by tests/test_mutations.py and bench/bench_mutations.py."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lexi_gguf.gguf import keys  # noqa: E402
from lexi_gguf.testbeds.mutate import header_cases, lexi_cases, materialize  # noqa: E402

FAILURES = ("traceback", "signal", "hang", "left-output", "bad-output", "accepted")
# commands that read the lexi keys as they are: exit 0 on a damaged lexi case is a failure
READS_LEXI = ("inspect", "chat", "serve", "bench", "trace", "relayout")
HEAVY = ("chat", "serve", "bench", "trace")      # these load the model in llama.cpp


# ---- running them ------------------------------------------------------------------------------------

def commands(model: str, out: str, trace: str, row: list[int]) -> dict[str, list[str]]:
    """Each command as a user types it, with the work kept small."""
    return {
        "inspect": ["inspect", model],
        "apply": ["apply", model, "-o", out, "--k", ",".join(map(str, row))],
        "relayout": ["relayout", model, "--trace", trace, "-o", out],
        "chat": ["chat", model, "--max-tokens", "2", "--ctx", "64", "--threads", "1"],
        "serve": ["serve", model, "--ctx", "64", "--threads", "1"],     # the worker's server never listens
        "bench": ["bench", model, "--budgets", "1", "--n-prompt", "4", "--n-gen", "2", "--reps", "1", "--threads", "1",
                  "--json", out + ".json"],
        "trace": ["trace", model, "--prompts", trace + ".prompts", "--max-tokens", "1", "--ctx", "64",
                  "--threads", "1", "-o", out + ".npz"],
    }


def _output_ok(path: Path) -> str | None:
    """Why a file a command wrote is not sound, or None."""
    from lexi_gguf import LexiError
    from lexi_gguf.gguf.reader import model_info
    try:
        model_info(path)          # scan + gguf-py + the lexi contract
    except LexiError as e:
        return str(e)
    return None


def run_one(argv: list[str], outdir: Path, lexi_damaged: bool) -> dict:
    """One command in this (worker) process, classified."""
    import contextlib
    import io
    import traceback

    from lexi_gguf import cli
    err, outbuf = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    rc, tb = None, None
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(outbuf):
            sys.stdin = io.StringIO("Tell me about the river.\n")
            rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 2
    except Exception:
        tb = traceback.format_exc(limit=4)
    finally:
        sys.stdin = sys.__stdin__
    dt = time.perf_counter() - t0
    left = sorted(p.name for p in outdir.iterdir())
    res = {"seconds": round(dt, 3)}
    if tb is not None:
        res.update(outcome="traceback", detail=tb[-600:])
    elif rc == 0:
        bad = [why for p in outdir.iterdir() if p.suffix == ".gguf" and (why := _output_ok(p))]
        if bad:
            res.update(outcome="bad-output", detail=bad[0][:300])
        elif lexi_damaged and argv[0] in READS_LEXI:
            res.update(outcome="accepted", detail=outbuf.getvalue()[-300:])
        else:
            res.update(outcome="ok")
    else:
        lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("lexi-gguf: error:")]
        if left:
            res.update(outcome="left-output", detail=", ".join(left))
        else:
            res.update(outcome="refused", detail=(lines[-1] if lines else err.getvalue()[-300:]))
    for p in outdir.iterdir():
        p.unlink()
    return res


def worker() -> int:
    """Read one task a line (JSON) on stdin, answer one result a line on stdout."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    import uvicorn
    uvicorn.run = lambda *a, **kw: None     # `serve` loads, checks and builds its app, then returns: nothing listens
    real_out = sys.stdout
    for line in sys.stdin:
        task = json.loads(line)
        res = run_one(task["argv"], Path(task["outdir"]), task["lexi_damaged"])
        real_out.write(json.dumps(res) + "\n")
        real_out.flush()
    return 0


class Pool:
    """One worker process at a time, replaced when it dies or hangs."""

    def __init__(self, timeout: float):
        self.timeout, self.proc = timeout, None

    def _start(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.mutations", "worker"], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1)

    def run(self, task: dict) -> dict:
        import select
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return {"outcome": "hang", "detail": f"no answer in {self.timeout:.0f} s"}
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            self.proc = None
            return {"outcome": "signal", "detail": f"the process ended with {rc} (a signal or a C++ abort)"}
        return json.loads(line)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def campaign(src: Path, work: Path, *, seed: int = 0, flips: int = 60, cmds=None, heavy_every: int = 4,
             timeout: float = 60.0, progress: bool = True) -> dict:
    """Build the cases of src, run them, and return the figures: cases, runs, outcomes by command and by
    kind, and every failure. The commands that load the model (HEAVY) run on every lexi case, on every
    header case whose structure still scans (the damage reaches llama.cpp's loader), and on every
    `heavy_every`-th of the others (all with heavy_every=1): those are refused by the same structure check
    inspect, apply and relayout run into."""
    from lexi_gguf.gguf.reader import model_info
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    cases = header_cases(src, rng, flips) + lexi_cases(src, work)
    info = model_info(src)
    row = [int(x) for x in info.lexi[keys.EXPERT_USED_COUNT]]
    trace = work / "source.trace.npz"
    (work / "source.trace.npz.prompts").write_text("The river\n")
    if not trace.exists():
        from lexi_gguf import cli
        assert cli.main(["trace", str(src), "--prompts", str(work / "source.trace.npz.prompts"),
                         "--max-tokens", "2", "--ctx", "64", "--threads", "1", "-o", str(trace)]) == 0
    outdir = work / "out"
    outdir.mkdir(exist_ok=True)
    pool = Pool(timeout)
    results = []
    t0 = time.perf_counter()
    try:
        for i, case in enumerate(cases):
            model = materialize(case, src, work / "case.gguf")
            scans = True
            cmd = commands(str(model), str(outdir / "o.gguf"), str(trace), row)
            for name, argv in cmd.items():
                if cmds and name not in cmds:
                    continue
                if name in HEAVY and case.family == "header" and i % heavy_every and not scans:
                    continue
                r = pool.run({"argv": argv, "outdir": str(outdir), "lexi_damaged": case.family == "lexi"})
                results.append({"case": case.id, "family": case.family, "kind": case.kind, "detail": case.detail,
                                "command": name, **r})
                if name == "inspect":      # the structure check refused it: llama.cpp's loader never sees it
                    scans = "is not a valid GGUF file" not in r.get("detail", "")
                for p in outdir.iterdir():     # a worker that died leaves its outputs: counted, then cleared
                    p.unlink()
            if progress and (i + 1) % 20 == 0:
                el = time.perf_counter() - t0
                print(f"mutations: {i + 1}/{len(cases)} cases, {len(results)} runs, {el:.0f} s, "
                      f"ETA {el / (i + 1) * (len(cases) - i - 1):.0f} s", file=sys.stderr, flush=True)
    finally:
        pool.close()
    return summarize(cases, results, time.perf_counter() - t0)


def summarize(cases, results, seconds: float) -> dict:
    by_cmd: dict = {}
    by_kind: dict = {}
    secs: dict = {}
    for r in results:
        secs[r["command"]] = secs.get(r["command"], 0.0) + r.get("seconds", 0.0)
        by_cmd.setdefault(r["command"], {}).setdefault(r["outcome"], 0)
        by_cmd[r["command"]][r["outcome"]] += 1
        k = f"{r['family']}:{r['kind']}"
        by_kind.setdefault(k, {}).setdefault(r["outcome"], 0)
        by_kind[k][r["outcome"]] += 1
    return {"kind": "mutation-campaign", "cases": len(cases), "runs": len(results), "seconds": round(seconds, 1),
            "commands": sorted(by_cmd), "by_command": by_cmd, "by_mutation": by_kind,
            "seconds_by_command": {k: round(v, 1) for k, v in secs.items()},
            "failures": [r for r in results if r["outcome"] in FAILURES]}


if __name__ == "__main__":
    if sys.argv[1:] == ["worker"]:
        sys.exit(worker())
    print("usage: python -m bench.mutations worker", file=sys.stderr)
    sys.exit(2)
