"""Report renderer of bench_expert_cache: the runtime expert cache (--expert-cache) on a true-size file
with replayed routing, beside stock mmap and prefetch chosen under the same memory."""
from __future__ import annotations

from .markdown import family, num, table, targets


@family("expert-cache", "Runtime expert cache: bounded expert memory with the project's policy",
        "bench/bench_expert_cache.py", "docs/memory.md", "decode tok/s, bytes read and resident expert bytes of "
        "--expert-cache inside a memory limit, against stock mmap and prefetch chosen at the same limit")
def _expert_cache(d: dict) -> list[str]:
    gib = 2 ** 30
    out = [f"`{d.get('file')}` ({num(d.get('file_bytes', 0) / gib, '.1f')} GiB, {d.get('blocks')} blocks; non-expert "
           f"weights {num(d.get('non_expert_bytes', 0) / gib, '.2f')} GiB); routing: {d.get('routing')}; full k; "
           f"{d.get('threads')} threads; warm-up {d.get('warmup')} tokens, then {d.get('n_gen')} timed; one run each.",
           "Baselines (stock mmap = prefetch off; prefetch chosen), full k, same limit:",
           table(["limit", "mode", "tok/s", "MB read / token", "from"],
                 [[f"1/{1 / b['fraction']:g} x file", b["prefetch"], num(b["tok_s"], ".3f"),
                   num(b.get("mb_read_per_token"), ".0f"), b.get("from", "-")] for b in d.get("baselines", [])]),
           "Expert cache inside the same limit (SIZE = limit - non-expert weights - anonymous margin):",
           table(["limit", "cache GiB", "policy", "tok/s", "vs stock", "vs prefetch", "MB read / token",
                  "MB asked / token", "hit rate", "resident experts GiB", "within SIZE + 5 %", "evictions"],
                 [[f"1/{1 / r['fraction']:g} x file", num(r["cache_bytes"] / gib), r["policy"], num(r["tok_s"], ".3f"),
                   num(r.get("vs_stock"), ".2f") + "x" if r.get("vs_stock") else "-",
                   num(r.get("vs_prefetch"), ".2f") + "x" if r.get("vs_prefetch") else "-",
                   num(r["mb_read_per_token"], ".0f"), num(r["mb_asked_per_token"], ".0f"), num(r["hit_rate"], ".3f"),
                   num((r["resident_expert_bytes"] or 0) / gib), num(r["within_budget"]), str(r["evictions"])]
                  for r in d.get("rows", [])])]
    return out + targets(d)
