"""One memory-limited decode in a fresh interpreter (`python -m lexi_gguf.measure.memlimit.child SPEC`):
it joins the group, evicts, loads mmapped, warms up, decodes, and prints its result as one tagged
JSON line that run_child reads."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ... import LexiError
from .cgroup import fmt_size, read_peak, read_stat, write_value
from .counters import counters, delta, proc_status_kib
from .pagecache import PAGE, evict, resident_bytes


RESULT_TAG = "LEXI_MEMLIMIT_RESULT "


def decode(spec: dict) -> dict:
    """Runs in the child: join the group, evict, load mmapped, warm up, decode, count."""
    group = Path(spec["cgroup"]) if spec.get("cgroup") else None
    if group is not None:
        write_value(group / "cgroup.procs", os.getpid())     # before anything big is loaded or mapped
    import numpy as np

    from ...runtime.llama import load
    path = spec["model"]
    ev = evict(path)
    c0 = counters(group)
    options = None
    if spec.get("expert_cache"):      # the runtime's expert cache (runtime.expertcache) inside the same limit
        from ...runtime.options import LoadOptions
        options = LoadOptions(expert_cache=str(spec["expert_cache"]), cache_policy=spec.get("cache_policy"),
                              cache_predictor=spec.get("cache_predictor"))
    llm = load(path, kv_overrides=spec["kv"] or None, n_ctx=spec["warmup"] + spec["n_gen"] + 16, n_batch=32,
               n_threads=spec["threads"], n_gpu_layers=0, use_mmap=True, use_mlock=False, options=options,
               prefetch=spec.get("prefetch", "off"), repack=spec.get("repack", "auto"))
    rp = None
    if spec.get("replay"):        # recorded routing instead of the router's (runtime.replay)
        from ...runtime.replay import for_model
        rp = for_model(llm, path, spec["replay"], spec.get("counts"))
    pinned = 0
    if spec.get("pin"):          # hot experts locked in memory, read as part of the load: the pin experiment
        from bench.pin import mlock_ranges    # lives in the checkout's bench/ (on PYTHONPATH: procs.package_env)
        pinned = mlock_ranges(path, [tuple(x) for x in spec["pin"]])
    c1 = counters(group)
    rng = np.random.default_rng(spec.get("seed", 0))
    llm.reset()
    evaluated: list[int] = []     # every token id evaluated, in order: the run's own trace can be replayed
    if spec.get("prompt"):
        # generated text: the prompt, then tokens sampled (top 40, temperature 0.8) with the seeded numpy
        # generator, so every run decodes the same text (llama-cpp-python's sampler takes seed 0 for
        # "random"); top-k first keeps the sampling's cost out of the decode clock's way
        from ...runtime.trace import last_logits
        evaluated += llm.tokenize(spec["prompt"].encode())
        llm.eval(evaluated)

        def next_token():
            logits = last_logits(llm)
            top = np.argpartition(logits, -40)[-40:]
            p = np.exp((logits[top] - logits[top].max()) / 0.8)
            return int(top[rng.choice(len(top), p=p / p.sum())])
    else:
        # random token ids, as llama-bench
        toks = iter(rng.integers(100, llm.n_vocab(), spec["warmup"] + spec["n_gen"]).tolist())

        def next_token():
            return next(toks)
    for _ in range(spec["warmup"]):
        evaluated.append(int(next_token()))
        llm.eval(evaluated[-1:])
    decode_from = len(evaluated)
    resident_warm = resident_bytes(path)
    if group is not None and spec.get("version") == 1:
        with contextlib.suppress(OSError):
            write_value(group / "memory.max_usage_in_bytes", 0)   # v1: the peak from here on
    c2 = counters(group)
    per_tok = []
    for _ in range(spec["n_gen"]):
        t = int(next_token())
        evaluated.append(t)
        t0 = time.perf_counter()
        llm.eval([t])
        per_tok.append(time.perf_counter() - t0)
    c3 = counters(group)
    out = {"load_s": c1["t"] - c0["t"], "load_read_bytes": delta(c0, c1, "read_bytes"),
           "load_majflt": delta(c0, c1, "majflt"), "warmup_s": c2["t"] - c1["t"],
           "warmup_majflt": delta(c1, c2, "majflt"), "warmup_read_bytes": delta(c1, c2, "read_bytes"),
           "decode_s": c3["t"] - c2["t"], "majflt": delta(c2, c3, "majflt"), "minflt": delta(c2, c3, "minflt"),
           "read_bytes": delta(c2, c3, "read_bytes"), "cg_pgmajfault": delta(c2, c3, "cg_pgmajfault"),
           "cg_pgpgin_bytes": (delta(c2, c3, "cg_pgpgin") or 0) * PAGE if c2.get("cg_pgpgin") is not None else None,
           "token_ms": [x * 1e3 for x in per_tok], "evicted": ev, "resident_after_warmup": resident_warm,
           "resident_after_decode": resident_bytes(path), "rss_anon_bytes": (proc_status_kib("RssAnon") or 0) * 1024,
           "rss_file_bytes": (proc_status_kib("RssFile") or 0) * 1024, "repacked": llm._lexi_repack,
           "tokens": evaluated, "decode_from": decode_from, "pinned_bytes": pinned,
           "locked_bytes": (proc_status_kib("VmLck") or 0) * 1024}
    if group is not None:
        out["decode_peak_bytes"] = read_peak(group, spec.get("version", 1)) if spec.get("version") == 1 else None
        st = read_stat(group)
        out["cg_usage_end"] = {k: st.get(k) for k in ("cache", "rss", "mapped_file", "file", "anon", "file_mapped")
                               if k in st}
    if rp is not None:
        rp.check()
        out["replay"] = rp.summary()
        rp.remove()
    if getattr(llm, "_lexi_expert_cache", None) is not None:
        llm._lexi_expert_cache.check()
        out["expert_cache"] = llm._lexi_expert_cache.summary()
    llm.close()
    return out


def run_child(spec: dict, *, timeout: float | None = None) -> dict:
    """One configuration in a fresh interpreter; its result is the tagged JSON line it prints."""
    from ...runtime.procs import ChildFailed, package_env
    cmd = [sys.executable, "-m", "lexi_gguf.measure.memlimit.child", json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=package_env())
    out = (r.stdout or "") + (r.stderr or "")
    if r.returncode != 0:
        if r.returncode in (-9, 137) and spec.get("cgroup"):
            raise ChildFailed(f"the decode under a {fmt_size(spec['limit'])} limit (out of memory: the limit is "
                              "below what the process needs besides the model's cache)", r.returncode, out)
        raise ChildFailed("the memory-limited decode", r.returncode, out)
    for line in reversed(r.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise LexiError(f"the memory-limited decode printed no result:\n{out[-2000:]}")


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    try:
        res = decode(spec)
    except LexiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(RESULT_TAG + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
