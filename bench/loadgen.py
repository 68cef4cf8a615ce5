"""A bounded load on an OpenAI-compatible server (either `serve` engine): C concurrent clients send a
fixed number of completions within a time limit; requests/s, tokens/s, latency p50/p99, failed and
lost requests, and the memory the server's process tree holds (PSS after the load: the mmapped
weights that router children share count once; the peak RSS of each process). Misbehaving clients (a body that is not JSON, a
prompt far over the context, a client that sends half a request and stalls) can run beside the load.

Bench and test helpers (bench_serve_load.py, bench_rpc.py; tests/test_serve.py, test_llama_server.py,
test_rpc.py start servers with free_port and wait_until_serving): not part of the package since issue 34
(it was lexi_gguf.measure.load).
"""
from __future__ import annotations

import concurrent.futures
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse


def free_port() -> int:
    """A TCP port nothing listens on now (for a server started on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def models(base: str, key: str | None = None) -> list[dict]:
    """The server's /v1/models entries (either engine; llama-server's router adds each one's status)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    req = urllib.request.Request(base + "/v1/models", headers=headers)
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())["data"]


def wait_until_serving(proc, base: str, key: str | None = None, *, timeout: float = 120.0, ids=None) -> None:
    """Wait until the server started as `proc` answers /v1/models (with every id in `ids` loaded, for
    llama-server's router); RuntimeError if it exits first or the time runs out (it is then killed)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            out = proc.stdout.read()[-3000:] if proc.stdout else ""
            raise RuntimeError(f"the server exited with status {proc.returncode}: {out}")
        try:
            loaded = {m["id"] for m in models(base, key) if m.get("status", {}).get("value", "loaded") == "loaded"}
            if ids is None or set(ids) <= loaded:
                return
        except (urllib.error.URLError, ConnectionError, KeyError, ValueError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server at {base} was not serving after {timeout:.0f} s")
        time.sleep(0.5)


def tree_pids(pid: int) -> list[int]:
    """pid and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def tree_memory_mib(pid: int) -> dict:
    """A process tree's memory, MiB: summed Pss and Rss (smaps_rollup) and summed VmHWM (each process's
    peak RSS, kept by the kernel; shared weights count once per process). Reading smaps_rollup walks the
    target's page tables under its mmap lock and slowed a serving Python process ~10x when sampled every
    0.25 s, so it is read once, after the load, and the peak comes from VmHWM."""
    pss = rss = hwm = 0
    for p in tree_pids(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1])
            hwm += next(int(x.split()[1]) for x in Path(f"/proc/{p}/status").read_text().splitlines()
                        if x.startswith("VmHWM:"))
        except (OSError, StopIteration):
            continue
    return {"pss_mib": pss / 1024, "rss_mib": rss / 1024, "hwm_mib": hwm / 1024}


def post(base: str, path: str, body: bytes, key: str | None, timeout: float) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(base + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {}


def completion(base, model, prompt, max_tokens, key, timeout) -> dict:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8,
                       "seed": 0}).encode()
    t0 = time.perf_counter()
    try:
        status, out = post(base, "/v1/completions", body, key, timeout)
    except (OSError, ValueError) as e:          # connection refused / reset / timed out
        return {"ok": False, "status": None, "error": str(e), "latency_s": time.perf_counter() - t0, "tokens": 0}
    ok = status == 200 and bool(out.get("choices"))
    return {"ok": ok, "status": status, "latency_s": time.perf_counter() - t0,
            "tokens": int(out.get("usage", {}).get("completion_tokens", 0)) if ok else 0,
            "error": None if ok else json.dumps(out)[:200]}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def run_load(base: str, model: str, prompts: list[str], *, clients: int, requests: int, max_tokens: int = 32,
             time_limit: float = 300.0, key: str | None = None, pid: int | None = None, beside=None) -> dict:
    """`requests` completions from `clients` threads; a request not back by the time limit is lost.
    beside: a function run in a thread alongside the load (misbehaving clients); its result is kept."""
    results: list[dict] = []
    side: dict = {}
    deadline = time.perf_counter() + time_limit
    with concurrent.futures.ThreadPoolExecutor(clients) as pool, \
            concurrent.futures.ThreadPoolExecutor(1) as side_pool:
        t0 = time.perf_counter()
        side_f = side_pool.submit(beside) if beside else None
        futs = [pool.submit(completion, base, model, prompts[i % len(prompts)], max_tokens, key,
                            max(1.0, deadline - time.perf_counter())) for i in range(requests)]
        for f in futs:
            try:
                results.append(f.result(timeout=max(0.1, deadline - time.perf_counter())))
            except concurrent.futures.TimeoutError:
                pass
        wall = time.perf_counter() - t0
        if side_f is not None:
            side = side_f.result()
    mem = tree_memory_mib(pid) if pid else {}
    ok = [r for r in results if r["ok"]]
    lat = [r["latency_s"] for r in ok]
    return {"clients": clients, "requests": requests, "ok": len(ok), "failed": len(results) - len(ok),
            "lost": requests - len(results), "wall_s": wall, "requests_per_s": len(ok) / wall,
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "p50_s": _pct(lat, 0.5), "p99_s": _pct(lat, 0.99),
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:5], **mem, "misbehaving": side}


def misbehave(base: str, model: str, key: str | None, n_ctx: int) -> dict:
    """A body that is not JSON, a prompt ~8x the context, and a client that sends half a request and
    stalls for 5 s: what each got back (the load beside them must not notice)."""
    out = {}
    status, _ = post(base, "/v1/completions", b"{not json", key, 30)
    out["not_json"] = status
    big = json.dumps({"model": model, "prompt": "river " * (8 * n_ctx), "max_tokens": 4}).encode()
    try:
        out["over_context"] = post(base, "/v1/completions", big, key, 120)[0]
    except OSError as e:
        out["over_context"] = f"connection error: {e}"
    u = urlparse(base)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 4096\r\n\r\n{\"model\": ")
        time.sleep(5.0)
    out["stalled_client"] = "closed after 5 s"
    return out


def table(rows: list[dict]) -> str:
    head = ("| engine | clients | ok / sent | failed | lost | req/s | tok/s | p50 s | p99 s | PSS MiB | peak RSS MiB |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['clients']} | {r['ok']}/{r['requests']} | {r['failed']} | {r['lost']} | "
                     f"{r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | "
                     f"{r['pss_mib']:.0f} | {r['hwm_mib']:.0f} |")
    return "\n".join(lines)

