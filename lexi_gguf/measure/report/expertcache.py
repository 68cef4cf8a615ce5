"""Report renderer of bench_expert_cache: the runtime expert cache (--expert-cache) on a true-size file
with replayed routing, beside stock mmap and prefetch chosen under the same memory."""
from __future__ import annotations

from .markdown import family, num, table, targets


@family("expert-cache", "Runtime expert cache: bounded expert memory with the project's policy",
        "bench/bench_expert_cache.py", "docs/memory.md", "decode tok/s, bytes read and resident expert bytes of "
        "--expert-cache inside a memory limit, against stock mmap and prefetch chosen at the same limit")
def _expert_cache(d: dict) -> list[str]:
    gib = 2 ** 30
    reps = (f"cache rows and prefetch chosen: median of {d['reps']} fresh runs, stock mmap of {d.get('stock_reps', 1)}"
            if d.get("reps") else "one run each")
    split = f", split in {d['shards']} shards by llama-gguf-split" if (d.get("shards") or 1) > 1 else ""
    out = [f"`{d.get('file')}` ({num(d.get('file_bytes', 0) / gib, '.1f')} GiB{split}, {d.get('blocks')} blocks; non-expert "
           f"weights {num(d.get('non_expert_bytes', 0) / gib, '.2f')} GiB); routing: {d.get('routing')}; full k; "
           f"{d.get('threads')} threads; warm-up {d.get('warmup')} tokens, then {d.get('n_gen')} timed; {reps}.",
           "Baselines (stock mmap = prefetch off; prefetch chosen), full k, same limit:",
           table(["limit", "mode", "tok/s", "runs", "MB read / token", "from"],
                 [[f"1/{1 / b['fraction']:g} x file", b["prefetch"], num(b["tok_s"], ".3f"), _range(b.get("tok_s_runs")),
                   num(b.get("mb_read_per_token"), ".0f"), b.get("from", "-")] for b in d.get("baselines", [])]),
           "Expert cache inside the same limit (SIZE = limit - non-expert weights - anonymous margin):",
           table(["limit", "cache GiB", "policy", "tok/s", "runs", "vs stock", "vs prefetch", "MB read / token",
                  "MB asked / token", "hit rate", "resident experts GiB", "resident / SIZE", "within SIZE + 5 %",
                  "evictions", "callback s", "worker s", "stray MB dropped", "disk-bound tok/s", "of disk-bound",
                  "guesses read / used / refused"],
                 [[f"1/{1 / r['fraction']:g} x file", num(r["cache_bytes"] / gib), r["policy"], num(r["tok_s"], ".3f"),
                   _range(r.get("tok_s_runs")),
                   num(r.get("vs_stock"), ".2f") + "x" if r.get("vs_stock") else "-",
                   num(r.get("vs_prefetch"), ".2f") + "x" if r.get("vs_prefetch") else "-",
                   num(r["mb_read_per_token"], ".0f"), num(r["mb_asked_per_token"], ".0f"), num(r["hit_rate"], ".3f"),
                   num((r["resident_expert_bytes"] or 0) / gib), num((r["resident_expert_bytes"] or 0) / r["cache_bytes"], ".3f"),
                   num(r["within_budget"]), str(r["evictions"]), num(r.get("callback_seconds"), ".2f"),
                   num(r.get("io_seconds"), ".2f"), num((r.get("stray_bytes") or 0) / 1e6, ".0f") if "stray_bytes" in r else "-",
                   num(r.get("disk_bound_tps"), ".2f"), num(r.get("vs_disk_bound"), ".2f"), _look(r.get("lookahead"))]
                  for r in d.get("rows", [])])]
    if any(r.get("lookahead") for r in d.get("rows", [])):
        out.append("Guesses (`--cache-policy learned`): look-ahead reads issued by the clock gate / of them requested "
                   "later / refused (expected gain <= 0), summed over the median run.")
    if d.get("measured"):
        out.append(f"Measured at commit {d['measured'].get('commit')} ({d['measured'].get('date')}); the disk-bound "
                   "columns added afterwards from the same run's read-rate probes (`--disk-bound`, nothing re-measured).")
    if d.get("disk_seq_read_mb_s"):
        out.append(f"The file's sequential read rate before / after the runs: "
                   f"{' / '.join(num(x, '.0f') for x in d['disk_seq_read_mb_s'])} MB/s (a virtual disk shared with "
                   f"other jobs); load average at the end {', '.join(num(x, '.1f') for x in d.get('load_avg') or [])} "
                   f"on {(d.get('machine') or {}).get('cores', '?')} cores. Callback s: time in the routing callback "
                   "(the decode's critical path); worker s: the cache's worker thread (asks, policy, drops, scrub).")
    return out + targets(d)


def _range(runs) -> str:
    return f"{num(min(runs), '.3f')}-{num(max(runs), '.3f')}" if runs and len(runs) > 1 else "-"


def _look(la) -> str:
    return f"{la['prefetches']} / {la['prefetch_used']} / {la['refused']}" if la else "-"
