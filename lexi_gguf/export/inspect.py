"""`lexi-gguf inspect`: what a GGUF stores (per-layer k per budget, base k, method) and what it saves:
active parameters and active bytes per token, which bound decode speed on memory-bound machines."""
from __future__ import annotations

from pathlib import Path

from ..gguf import keys
from ..gguf.reader import active, footprint, read_ladder

def inspect_gguf(path: str | Path) -> dict:
    from ..runtime.llama import is_patched
    fp = footprint(path)
    info = fp["info"]
    lx = info.lexi
    full_b, full_p = active(fp, info.base_counts)
    configs = []
    if keys.EXPERT_USED_COUNT in lx:
        configs.append({"name": "default", "index": None, "expert_used_count": [int(x) for x in lx[keys.EXPERT_USED_COUNT]]})
    for row in read_ladder(info):
        configs.append({"name": f"budget {row['budget']:.3g}", "index": row["index"],
                        "expert_used_count": row["expert_used_count"]})
    for c in configs:
        b, p = active(fp, c["expert_used_count"])
        c.update(total=sum(c["expert_used_count"]), avg_k=sum(c["expert_used_count"]) / len(info.moe_layers),
                 active_bytes=b, active_params=p, bytes_ratio=b / full_b, params_ratio=p / full_p,
                 ideal_speedup=full_b / b)
    return {"path": str(path), "arch": info.arch, "block_count": info.block_count, "expert_count": info.expert_count,
            "base_k": info.expert_used_count, "moe_layers": info.moe_layers,
            "shards": [str(p) for p in info.shards],
            "method": lx.get(keys.METHOD), "lexi_version": lx.get(keys.VERSION),
            "has_sensitivity": keys.SENS_DEVIATION in lx, "experts_relaid_out": keys.EXPERT_ORDER in lx,
            "full": {"active_bytes": full_b, "active_params": full_p}, "configs": configs,
            "runtime_honours_keys": is_patched()}


def render(d: dict) -> str:
    lines = [f"{d['path']}: {d['arch']}, {d['block_count']} blocks ({len(d['moe_layers'])} MoE), "
             f"{d['expert_count']} experts, base k {d['base_k']}"
             + (f", split into {len(d['shards'])} shards" if len(d.get("shards", [])) > 1 else ""),
             f"method: {d['method'] or '-'}   lexi-gguf {d['lexi_version'] or '-'}   "
             f"sensitivity table stored: {'yes' if d['has_sensitivity'] else 'no'}"
             + ("   experts in co-activation order (lexi-gguf relayout)" if d.get("experts_relaid_out") else ""),
             f"full model: {d['full']['active_params'] / 1e6:.2f} M active params, "
             f"{d['full']['active_bytes'] / 2**20:.1f} MiB active bytes per token"]
    if not d["configs"]:
        lines.append("no lexi keys: every layer runs the base k (use `lexi-gguf apply`)")
    else:
        lines.append("")
        lines.append("| config | ladder index | total | avg k | active params | active bytes | ideal decode speed-up |")
        lines.append("|---|---|---|---|---|---|---|")
        for c in d["configs"]:
            lines.append(f"| {c['name']} | {'-' if c['index'] is None else c['index']} | {c['total']} | {c['avg_k']:.2f} | "
                         f"{c['params_ratio']:.1%} | {c['bytes_ratio']:.1%} | {c['ideal_speedup']:.2f}x |")
        lines.append("")
        lines.append("per-layer k (MoE layers " + ",".join(map(str, d["moe_layers"])) + "):")
        for c in d["configs"]:
            lines.append(f"  {c['name']:>14}: " + " ".join(str(c["expert_used_count"][i]) for i in d["moe_layers"]))
    lines.append("")
    lines.append("runtime: " + ("the llama_cpp in use honours the lexi keys" if d["runtime_honours_keys"] else
                                "the llama_cpp in use is NOT patched: it ignores lexi keys and runs base k (run `make setup`)"))
    return "\n".join(lines)
