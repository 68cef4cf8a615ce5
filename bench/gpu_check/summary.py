"""The tables of a bench/gpu_check.sh run, from its fidelity.jsonl and bench.jsonl (standard library only:
it runs on the GPU machine, where the project's venv is not). Usage: python3 summary.py RESULTS_DIR"""
import json
import sys
from pathlib import Path


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def main(out: Path) -> None:
    fid = rows(out / "fidelity.jsonl")
    print("\n| configuration / placement | counts run (traced) | ok | mean KL | max KL | bound | top-1 | max abs logit |")
    print("|---|---|---|---|---|---|---|---|")
    for r in fid:
        if "kl_mean" not in r:
            print(f"| {r['label']} | - | FAIL | {r.get('error', '')} | | | | |")
            continue
        traced = ",".join(str(k) for k in r["topk_traced"] if k)
        print(f"| {r['label']} | {traced} | {'yes' if r['ok'] else 'FAIL'} | {r['kl_mean']:.2e} | {r['kl_max']:.2e} "
              f"| {r['max_kl']:.2e} | {r['top1']:.3f} | {r['max_abs_logit']:.3g} |")
    bench = rows(out / "bench.jsonl")
    if not bench:
        return
    tps: dict[tuple[str, str], dict[str, float]] = {}
    for r in bench:
        lb = r["llama_bench"]
        test = "pp" if lb.get("n_prompt", 0) and not lb.get("n_gen", 0) else "tg"
        tps.setdefault((r["label"], r["placement"]), {})[test] = lb["avg_ts"]
        tps[(r["label"], r["placement"])]["counts"] = r["counts"]
    print("\n| configuration | counts | placement | prefill tok/s | decode tok/s | decode vs full |")
    print("|---|---|---|---|---|---|")
    for (label, place), v in tps.items():
        full = tps.get(("full", place), {}).get("tg")
        rel = f"{v['tg'] / full:.2f}x" if full and "tg" in v else "-"
        print(f"| {label} | {v['counts']} | {place} | {v.get('pp', 0):.1f} | {v.get('tg', 0):.1f} | {rel} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
