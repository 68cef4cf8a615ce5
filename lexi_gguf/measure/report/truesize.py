"""Report renderer of bench_true_size: a released MoE's shape with replayed routing, in RAM and under
memory limits, each limited run beside the clocked simulator's prediction."""
from __future__ import annotations

from .markdown import family, num, table, targets


@family("true-size", "True-size files: replayed routing in RAM and under memory limits", "bench/bench_true_size.py",
        "docs/memory.md", "decode tok/s and bytes read per token of a released MoE's shape (synth, random weights, "
        "routing replayed), measured and simulated")
def _true_size(d: dict) -> list[str]:
    ram = d.get("in_ram") or {}
    out = [f"`{d.get('file')}` ({num(d.get('file_bytes', 0) / 2**30, '.1f')} GiB; non-expert weights "
           f"{num(d.get('non_expert_bytes', 0) / 2**30, '.2f')} GiB); routing: {d.get('routing')}; "
           f"{d.get('threads')} threads; warm-up {d.get('warmup')} tokens, then {d.get('n_gen')} timed.",
           "In RAM (page cache warm), median of " + str(ram.get("reps", "?"))
           + (f" (measured by the run of {ram['reused_from']}, `--reuse-ram`)" if ram.get("reused_from") else "")
           + (f"; the file's first {ram['blocks']} blocks (it does not fit in RAM)"
              if ram.get("blocks") and ram.get("blocks") != d.get("blocks") else "") + ":",
           table(["config", "k per MoE layer (avg)", "tg t/s", "speed-up", "ideal (active bytes)", "of ideal"],
                 [[f"{r['config']} {r['budget']:g}", num(r.get("avg_k")), num(r["tg_tps"]), num(r.get("tg_speedup")) + "x",
                   num(r.get("ideal_speedup")) + "x",
                   num(r["tg_speedup"] / r["ideal_speedup"], ".0%") if r.get("ideal_speedup") else "-"]
                  for r in ram.get("rows", [])]),
           "Under memory limits (cgroup, file evicted first); simulated = `cache-sim --clock` on the same trace rows "
           "with the disk's measured rates and the in-RAM compute (bench docstring: the cost model)"
           + (f"; measured at commit {d['measured'].get('commit')} ({d['measured'].get('date')}), the simulated "
              "columns recomputed with the cost model of the commit stamped above (`--resimulate`)"
              if d.get("measured") else "") + ":",
           table(["limit", "config", "mode", "tok/s", "MB read / token", "disk-bound tok/s (Belady)",
                  "simulated ms / token", "measured ms / token", "simulated / measured - 1"],
                 [[f"{s['fraction']:g} x file", f"{s['config']} {s['budget']:g}", s["prefetch"], num(s["measured_tps"]),
                   num(s["measured_mb_per_token"], ".0f"), num(s["disk_bound_tps"]),
                   num(s["simulated_ms_per_token"], ".0f"), num(s["measured_ms_per_token"], ".0f"),
                   num(s["sim_error"], "+.0%")] for s in d.get("sim", [])])]
    return out + targets(d)


@family("apply-true-size", "`apply` at true size: time, memory, the allocation against samples",
        "bench/bench_apply_true_size.py", "docs/true-size.md",
        "the whole `lexi-gguf apply` (profile, allocation, streamed copy with read-back) on released MoE shapes "
        "(synth, random weights), and the allocation at 1/4x and 4x the samples")
def _apply_true_size(d: dict) -> list[str]:
    rows = d.get("shapes", {})
    out = [d.get("note", ""),
           table(["shape", "file", "blocks x experts (k)", "samples", "apply wall", "CPU s / threads", "load avg",
                  "profile", "per block", "peak RSS", "peak anonymous"],
                 [[n + (f" ({r['ran']['date'][:16]}, {r['ran']['commit']})" if r.get("ran") else ""), f"{r['quant']} {num(r['file_gib'], '.1f')} GiB", f"{r['moe_layers']} x {r['experts']} ({r['k']})",
                   str(r["samples"]), num(r["apply"]["wall_s"] / 60, ".1f") + " min",
                   num(r["apply"]["cpu_s"] / r["threads"] / 60, ".1f") + " min", num(r["apply"]["load_avg"], ".1f"),
                   num(r["profile_s"] / 60, ".1f") + " min", num(r["per_layer_s"], ".1f") + " s",
                   num(r["apply"]["peak_rss_gb"], ".2f") + " GB", num(r["apply"]["peak_anon_gb"], ".2f") + " GB"]
                  for n, r in rows.items()])]
    for n, r in rows.items():
        st = r.get("stability")
        if not st:
            continue
        budgets = list(next(iter(st.values())))
        ran = r.get("stability_ran")
        out += [f"{n}: the ladder's allocation at other sample counts against the default ({r['samples']}): blocks "
                "whose k changed, and the regret (summed deviation on the 4x table over that table's own optimum - 1)"
                + (f" (profiled by the run of {ran.get('date')}, commit {ran.get('commit')})" if ran else "") + ":",
                table(["samples"] + [f"budget {b}" for b in budgets],
                      [[s] + [f"{v[b]['changed_blocks']} changed, regret {num(v[b]['regret'], '.2%')}" for b in budgets]
                       for s, v in {**st, **{k: v for k, v in r.get("stability_at_4x", {}).items()
                                             if k != "default"}}.items()])]
    return out + targets(d)
