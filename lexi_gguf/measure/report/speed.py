"""Report renderers of the speed and memory benches: runtime, switch, CPU paths, profiling cost,
`apply` per quant type, memory-limited decode, repack, serving load, RPC, the read-back and synth."""
from __future__ import annotations

from pathlib import Path

from .markdown import cell, family, mib, num, rng, table, targets


@family("runtime", "Per-layer k at runtime", "bench/bench_runtime.py", "docs/method.md",
        "does a layer with fewer experts run faster, as much as its bytes say? (llama-cpp-python, prefill and decode)")
def _runtime(d: dict) -> list[str]:
    pp, tg = f"pp{d.get('n_prompt', '')}", f"tg{d.get('n_gen', '')}"
    rows = [[r["run"], r.get("expert_used_count"), rng(r, "pp"), rng(r, "tg", ".2f"), num(r.get("tg_speedup"), ".2f") + "x",
             num(r.get("ideal_speedup"), ".2f") + "x",
             num(r["tg_speedup"] / r["ideal_speedup"], ".0%") if r.get("tg_speedup") and r.get("ideal_speedup") else "-"]
            for r in d["rows"]]
    return [f"{d.get('model', '')}; {d.get('threads', '?')} threads, median of {d.get('reps', '?')} (min-max).",
            table(["run", "k per layer", f"{pp} t/s", f"{tg} t/s", "decode speed-up", "ideal (active bytes)", "of ideal"],
                  rows), *targets(d)]


@family("switch", "One model, every budget: the switch", "`lexi-gguf bench --switch`", "docs/gguf-contract.md",
        "decode speed per budget in one loaded model, and what switching budgets in place costs")
def _switch(d: dict) -> list[str]:
    rows = [[r["budget"], r.get("expert_used_count"), num(r["tg_tps"], ".1f")] for r in d["rows"]]
    sw = d.get("switched") or ["?", "?"]
    return [f"Model `{Path(str(d.get('model', ''))).name}`, {d.get('backend', '?')}, {d.get('threads', '?')} threads.",
            table(["budget", "k per layer", f"tg{d.get('n_gen', '')} t/s (same loaded model)"], rows),
            f"Switch {sw[0]} <-> {sw[1]} (median of {d.get('switches', '?')}): the call {num(d.get('switch_call_us'), '.0f')} us; "
            f"the first decode after it {num(d.get('first_decode_after_switch_ms'))} ms against a steady "
            f"{num(d.get('steady_decode_ms'))} ms (overhead {num(d.get('switch_overhead_ms'))} ms)."]


@family("cpu-paths", "CPU kernels: what leaving out AMX costs", "bench/bench_cpu_paths.py", "docs/backends.md",
        "the shipped runtime (repack on, AMX matmul not compiled in) against `--repack 0`, by llama-bench")
def _cpu_paths(d: dict) -> list[str]:
    def v(q, test, rp):
        r = next((x for x in d["rows"] if x["quant"] == q and x["test"] == test and int(x["repack"]) == rp), None)
        return f"{num(r['avg_ts'], '.1f')} ± {num(r.get('stddev_ts'), '.1f')}" if r else "-"
    quants = list(dict.fromkeys(r["quant"] for r in d["rows"]))
    pp, tg = f"pp{d.get('n_prompt', '')}", f"tg{d.get('n_gen', '')}"
    rows = [[q, v(q, "pp", 1), v(q, "pp", 0), v(q, "tg", 1), v(q, "tg", 0)] for q in quants]
    return [f"{d.get('model', '')}; {d.get('threads', '?')} threads, {d.get('reps', '?')} repetitions; AMX matmul "
            f"compiled in: {num(d.get('amx_matmul_compiled'))}.",
            table(["quant", f"{pp} t/s shipped", f"{pp} `--repack 0`", f"{tg} t/s shipped", f"{tg} `--repack 0`"], rows)]


@family("profile", "Stage 1 profiling cost", "bench/bench_profile.py", "docs/method.md",
        "seconds, throughput and peak memory of the data-free profile on synthetic bf16 layers")
def _profile(d: dict) -> list[str]:
    peaks = d.get("matmul_peak_gflops") or {}
    rows = [[r["shape"], r.get("hidden"), r.get("experts"), r.get("ffn"), r.get("k"), r.get("samples"),
             r.get("compute_dtype"), num(r.get("seconds"), ".1f"), num(r.get("gflop_per_s"), ".0f"),
             num(r.get("of_peak"), ".0%"), num(r.get("expert_weights_gib")),
             f"{num(r.get('peak_rss_gib'))} ({num(r.get('rss_target_gib'))})"] for r in d["rows"]]
    out = [f"torch matmul peak ({d.get('threads', '?')} threads): "
           + ", ".join(f"{k} {num(v, '.0f')} GFLOP/s" for k, v in peaks.items()) + "; the profiler uses the faster.",
           table(["layer", "hidden", "experts", "expert ffn", "k", "samples", "compute", "s / layer", "GFLOP/s",
                  "of matmul peak", "expert weights GiB", "peak RSS GiB (target)"], rows)]
    if d.get("olmoe_16_layers_seconds") is not None:
        out.append(f"OLMoE-1B-7B (16 layers) extrapolated: {num(d['olmoe_16_layers_seconds'], '.0f')} s.")
    sc = d.get("sample_check")
    if sc:
        out.append(f"The default model's allocation at {sc.get('samples')} and {2 * sc.get('samples', 0)} samples "
                   f"(independent draws; largest relative stderr of D {num(sc.get('max_rel_stderr'), '.2%')}):")
        out.append(table(["budget", f"k at {sc.get('samples')}", "k at 2x", "same", "regret on the 2x table",
                          "objective stderr"],
                         [[b, v.get("k_at_samples"), v.get("k_at_2x_samples"), num(v.get("same")),
                           f"{num(v.get('regret'), '.4f')} ({num(v.get('regret_rel'), '.2%')})",
                           num(v.get("objective_stderr"), ".4f")] for b, v in sc.get("budgets", {}).items()]))
    return out + targets(d)


@family("apply-quants", "`apply` per input quant type", "bench/bench_apply_quants.py", "docs/gguf-contract.md",
        "time, peak memory and the allocation of `lexi-gguf apply --budget 0.5` on each quant type users download")
def _apply_quants(d: dict) -> list[str]:
    lw = d.get("layer_expert_weights")
    rows = [[r["type"], str(r.get("expert_types", "")).removeprefix("gguf:"), num(r.get("file_mib"), ".0f"),
             num(r.get("apply_s"), ".1f"), num(r.get("peak_rss_mib"), ".0f"), r.get("k"), num(r.get("same_k_as_f32"))]
            for r in d["rows"]]
    return [f"OLMoE-shaped model `{d.get('shape', '?')}`"
            + (f" ({lw / 1e6:.0f} M expert weights a layer)" if isinstance(lw, (int, float)) else "")
            + f", `--budget 0.5 --samples {d.get('samples', '?')}`; time includes Python start-up; peak RSS is the "
            "process's VmHWM, mmapped file pages included.",
            table(["type", "experts read as", "file MiB", "apply s", "peak RSS MiB", "k per MoE layer", "same k as F32"],
                  rows)]


@family("memlimit", "A MoE larger than RAM", "bench/bench_memlimit.py", "docs/memory.md",
        "decode under a memory cgroup, model mmapped and evicted first: tok/s, faults and bytes read per token")
def _memlimit(d: dict) -> list[str]:
    disk = d.get("disk") or {}
    head = (f"{d.get('bench_model', Path(str(d.get('model', ''))).name)}. Model {mib(d.get('model_bytes'))} MiB under a "
            f"{mib(d.get('mem_limit_bytes'))} MiB limit (cgroup v{d.get('cgroup_version', '?')}), disk "
            f"`{disk.get('name', '?')}` read-ahead {disk.get('read_ahead_kb', '?')} KiB; {d.get('threads', '?')} threads, "
            f"{d.get('n_gen', '?')} decode tokens after {d.get('warmup', '?')} warm-up, {d.get('reps', '?')} run(s) each.")
    out = [head]
    routing = d.get("routing")
    if routing:
        out.append(f"Consecutive-token expert overlap (decode, sampled): mean {num(routing.get('overlap_mean'))}.")
    layout = d.get("layout")
    if layout:
        out.append(f"Co-activation layout: co-activated pairs side by side {num(layout.get('adjacent_pairs_id_order'), '.1%')}"
                   f" -> {num(layout.get('adjacent_pairs_coact_order'), '.1%')} (calibration prompts).")
    has_bel = any("belady_read_bytes_per_token" in r for r in d["rows"])
    rows = []
    for r in d["rows"]:
        pin = r.get("pin")
        bel = r.get("belady_read_bytes_per_token")
        rb = r.get("read_bytes_per_token")
        rows.append([r["config"], num(r.get("budget"), "g"), r.get("prefetch", "off"), r.get("repack_mode", "-"),
                     num(pin.get("fraction_of_room"), "g") if isinstance(pin, dict) else "-", num(r.get("avg_k")),
                     rng(r, "tg", ".2f"), num(r.get("tg_speedup")) + "x", num(r.get("majflt_per_token"), ".1f"),
                     num(rb / 1e6, ".1f") if rb is not None else "-",
                     *([num(rb / bel) + "x" if rb is not None and bel else "-"] if has_bel else []),
                     mib(r.get("peak_bytes"))])
    out.append(table(["config", "budget", "prefetch", "repack", "pinned (of room)", "avg k", "decode t/s",
                      "vs first row", "major faults / token", "MB read / token",
                      *(["read vs Belady"] if has_bel else []), "peak MiB"], rows))
    failed = d.get("failed_repack_modes") or {}
    for mode, err in failed.items():
        out.append(f"repack {mode}: failed: {cell(err)}")
    return out + targets(d)


@family("repack", "Repacked or read in place, when the model fits", "bench/bench_repack.py", "docs/memory.md",
        "ggml's CPU repack on and off in the same process: prefill, decode and the anonymous memory held")
def _repack(d: dict) -> list[str]:
    rows = [[r["config"], r["repack"], rng(r, "pp"), rng(r, "tg", ".2f"), num(r.get("rss_anon_mib"), ".0f")]
            for r in d["rows"]]
    return [f"`{Path(str(d.get('model', ''))).name}` ({mib(d.get('model_bytes'))} MiB, {d.get('quant', '?')}), "
            f"{d.get('threads', '?')} threads, {d.get('reps', '?')} repetitions.",
            table(["config", "repack", f"pp{d.get('n_prompt', '')} t/s", f"tg{d.get('n_gen', '')} t/s",
                   "RssAnon held MiB"], rows)]


@family("serve-load", "Serving many clients", "bench/bench_serve_load.py", "docs/serving.md",
        "the python engine against llama-server under 1-16 concurrent clients, on loopback")
def _serve_load(d: dict) -> list[str]:
    rows = [[r.get("engine"), r["clients"], f"{r['ok']}/{r['requests']}", r.get("failed"), r.get("lost"),
             num(r.get("requests_per_s")), num(r.get("tokens_per_s"), ".1f"), num(r.get("p50_s")), num(r.get("p99_s")),
             num(r.get("pss_mib"), ".0f"), num(r.get("hwm_mib"), ".0f")] for r in d["rows"]]
    out = [f"Model id `{d.get('model_id', '?')}`, {d.get('requests', '?')} requests x {d.get('max_tokens', '?')} tokens "
           f"per load, llama-server {d.get('parallel', '?')} slots, ctx {d.get('ctx', '?')}.",
           table(["engine", "clients", "ok / sent", "failed", "lost", "req/s", "tok/s", "p50 s", "p99 s", "PSS MiB",
                  "peak RSS MiB"], rows)]
    bad = [[r.get("engine"), *(cell(v) for v in r["misbehaving"].values())] for r in d["rows"] if r.get("misbehaving")]
    if bad:
        keys = list(next(r["misbehaving"] for r in d["rows"] if r.get("misbehaving")))
        out.append("Misbehaving clients beside the 4-client load, what they got:")
        out.append(table(["engine", *keys], bad))
    rt = d.get("router")
    if rt:
        out.append(f"llama-server router mode, {len(rt.get('budgets_served', []))} model ids (one child each): PSS "
                   f"{num(rt.get('pss_mib'), '.0f')} MiB, RSS {num(rt.get('rss_mib'), '.0f')} MiB (RSS counts the "
                   "shared weights once per child).")
    return out + targets(d)


@family("rpc", "Layers on other machines (RPC)", "bench/bench_rpc.py", "docs/rpc.md",
        "local against one and two ggml-rpc-servers on loopback (not a network: the protocol's overhead)")
def _rpc(d: dict) -> list[str]:
    rows = [[r["setup"], r.get("server_threads"), r["config"], num(r.get("pp_tps"), ".0f"), rng(r, "tg"),
             num(r.get("tg_vs_local")) + "x", num(r.get("pp_vs_local")) + "x"] for r in d["rows"]]
    return [f"Model `{Path(str(d.get('model', ''))).name}`, link: {d.get('link', '?')}; pp{d.get('n_prompt', '')} / "
            f"tg{d.get('n_gen', '')}, {d.get('reps', '?')} repetitions.",
            table(["setup", "server threads", "config", "pp t/s", "tg t/s", "tg vs local", "pp vs local"], rows)]


@family("readback", "The read-back of every written file: what it costs", "bench/bench_readback.py",
        "docs/gguf-contract.md", "apply's streamed copy of a ~17 GB file with and without the read-back check, and cp")
def _readback(d: dict) -> list[str]:
    med, runs = d.get("median_s") or {}, d.get("seconds") or {}
    rows = [[name, num(med.get(name), ".1f"), ", ".join(num(x, ".1f") for x in runs.get(name, []))] for name in med]
    return [f"A {num((d.get('file_bytes') or 0) / 2**30, '.1f')} GiB file ({d.get('blocks', '?')} MoE blocks, qwen3-30b-a3b "
            f"shape), each run timed until `sync`, median of {d.get('reps', '?')}.",
            table(["copy", "median s", "runs s"], rows),
            f"The read-back costs {num(d.get('read_back_s'), '.1f')} s, {num(d.get('read_back_share'), '.0%')} of the copy.",
            *targets(d)]



@family("synth", "Model files at true size (`lexi-gguf synth`)", "bench/bench_synth.py", "docs/true-size.md",
        "each released shape written with random weights at the quant people download: time, disk, the writer's "
        "memory, and the whole file loaded and decoded")
def _synth(d: dict) -> list[str]:
    rows = [[name, r.get("quant"), f"{r.get('layers')} x {r.get('experts')}", f"{r.get('vocab')} ({r.get('n_vocab')})",
             num(r.get("file_gib")), num(r.get("write_s"), ".1f"), num(r.get("write_mb_s"), ".0f"),
             num(r.get("on_disk_s"), ".1f"), num(r.get("writer_peak_rss_mib"), ".0f"), num(r.get("load_s"), ".1f"),
             f"{num(r.get('decode_s'), '.1f')} ({r.get('tokens')})", cell(r.get("finite")), num(r.get("expert_mib"))]
            for name, r in (d.get("shapes") or {}).items()]
    return [f"Generator {d.get('generator', '?')}; each file written with the read-back, timed until renamed and "
            "until synced, then loaded and decoded (finite: every logit of every decoded token).",
            table(["shape", "quant", "layers x experts", "vocab (rows)", "GiB", "write s", "MB/s", "on disk s",
                   "writer RSS MiB", "load s", "decode s (tokens)", "finite", "expert MiB"], rows), *targets(d)]
