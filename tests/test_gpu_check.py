"""What bench/gpu_check.sh carries to a lent CUDA machine (bench/gpu_check_prepare.py), checked without a
build (seconds): the trimmed tree's layout and size, the llama-bench edit, the reference file format and
its KL bound, the script's refusals and its summary. The build and the fidelity run on this CPU are
`make gpu-check-prepare` (minutes)."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import gpu_check_prepare as P   # noqa: E402

from conftest import LADDER, LADDER_DEFAULT   # noqa: E402


@pytest.fixture(scope="module")
def trimmed(tmp_path_factory, llama_cpp_dir):
    out = tmp_path_factory.mktemp("gpu-check")
    P.trim(llama_cpp_dir, out / "llama.cpp")
    P.pack(out / "llama.cpp", out / "llama.cpp.tar.gz")
    return out


def test_trimmed_tree_keeps_what_the_builds_need_and_nothing_else(trimmed):
    tree = trimmed / "llama.cpp"
    backends = sorted(p.name for p in (tree / "ggml" / "src").iterdir() if p.is_dir())
    assert backends == ["ggml-cpu", "ggml-cuda"]
    assert (tree / "ggml" / "src" / "ggml-cuda" / "template-instances").is_dir()
    assert (tree / "ggml" / "src" / "ggml.c").is_file() and (tree / "src" / "llama-graph.cpp").is_file()
    assert sorted(p.name for p in (tree / "tools").iterdir()) == ["CMakeLists.txt", "lexi-fidelity", "llama-bench",
                                                                  "perplexity"]
    assert not any((tree / d).exists() for d in ("models", "docs", "tests", "examples", "tools/server", "gguf-py"))
    # the patched tree: the lexi patches' C API is there
    assert "llama_model_n_expert_active" in (tree / "include" / "llama.h").read_text()
    bench = (tree / "tools" / "llama-bench" / "llama-bench.cpp").read_text()
    assert 'arg == "--override-kv"' in bench and "mparams.kv_overrides = lexi_kv_overrides.data()" in bench
    size = (trimmed / "llama.cpp.tar.gz").stat().st_size
    assert size < 8 << 20, f"the packed source is {size / 2**20:.1f} MiB"
    with tarfile.open(trimmed / "llama.cpp.tar.gz") as tf:
        names = tf.getnames()
    assert "llama.cpp/tools/lexi-fidelity/lexi-fidelity.cpp" in names and "llama.cpp/CMakeLists.txt" in names


def test_the_edited_and_added_sources_compile(trimmed):
    """lexi-fidelity.cpp and the edited llama-bench.cpp against the trimmed tree's headers (syntax and
    types only, seconds; the build itself is `make gpu-check-prepare`)."""
    tree = trimmed / "llama.cpp"
    inc = [f"-I{tree / d}" for d in ("include", "ggml/include", "common", "vendor", "tools/llama-bench")]
    for src in ("tools/lexi-fidelity/lexi-fidelity.cpp", "tools/llama-bench/llama-bench.cpp"):
        r = subprocess.run(["c++", "-std=c++17", "-fsyntax-only", "-Wall", *inc, str(tree / src)],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "warning" not in r.stderr, f"{src}:\n{r.stderr[-3000:]}"


def test_llama_bench_edit_fails_loudly_when_its_anchor_moves(tmp_path, llama_cpp_dir):
    src = (llama_cpp_dir / "tools" / "llama-bench" / "llama-bench.cpp").read_text()
    f = tmp_path / "llama-bench.cpp"
    f.write_text(src.replace("mparams.use_extra_bufts = repack;", "mparams.use_extra_bufts = repack != 0;"))
    with pytest.raises(SystemExit, match="has 0 copies of 'mparams.use_extra_bufts = repack;'"):
        P.edit_llama_bench(f)


def test_reference_file_round_trip_and_kl_bound(laddered_gguf, tmp_path):
    from lexi_gguf.runtime.llama import lexi_overrides
    tokens = list(range(100, 100 + P.N_PROMPT + P.N_GEN))
    rows, logits = [], {}
    for label, kv, want in (("default", {}, LADDER_DEFAULT), ("half", lexi_overrides(budget_index=2), LADDER[0.5]),
                            ("full", lexi_overrides(lexi=False), [4, 4, 4, 4])):
        ref = tmp_path / f"ref-{label}.bin"
        assert P.reference(laddered_gguf, kv, tokens, ref, threads=2) == want
        raw = ref.read_bytes()
        assert raw[:8] == b"LEXIFID1"
        assert np.frombuffer(raw, np.int32, len(tokens), 20).tolist() == tokens
        logits[label] = P.read_reference(ref)
        assert logits[label].shape[0] == len(tokens) and np.isfinite(logits[label]).all()
        rows.append({"label": label, "counts": want})
    assert P.mean_kl(logits["half"], logits["half"]) == pytest.approx(0, abs=1e-12)
    bound = P.kl_bound(rows[0], rows, logits)
    assert 0 < bound == pytest.approx(0.1 * min(P.mean_kl(logits["default"], logits[o]) for o in ("half", "full")))


def test_script_refuses_without_its_pack_and_summarises_results(tmp_path):
    script = ROOT / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run(["bash", str(script), "--cpu"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "LEXI_GPU_PACK": str(tmp_path / "none"), "OUT": str(tmp_path / "o")})
    assert r.returncode == 2 and "run .venv/bin/python bench/gpu_check_prepare.py first" in r.stdout
    out = tmp_path / "res"
    out.mkdir()
    fid = {"label": "lexi-0.5/split", "topk_traced": [3, 2, 2, 2, 2, 1], "ok": True, "kl_mean": 1e-6, "kl_max": 3e-6,
           "max_kl": 9e-4, "top1": 1.0, "max_abs_logit": 0.01}
    (out / "fidelity.jsonl").write_text(json.dumps(fid) + "\n" + json.dumps({"label": "x/gpu", "ok": False,
                                                                           "error": "exit 2"}) + "\n")
    lb = [{"label": lbl, "placement": "gpu", "counts": c, "llama_bench": {"n_prompt": p, "n_gen": g, "avg_ts": t}}
          for lbl, c, p, g, t in (("full", "4,4", 512, 0, 1000.0), ("full", "4,4", 0, 128, 100.0),
                                  ("lexi-0.5", "3,1", 512, 0, 1500.0), ("lexi-0.5", "3,1", 0, 128, 150.0))]
    (out / "bench.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lb))
    s = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check" / "summary.py"), str(out)],
                       capture_output=True, text=True, check=True).stdout
    assert "| lexi-0.5/split | 3,2,2,2,2,1 | yes |" in s and "| x/gpu | - | FAIL | exit 2 |" in s
    assert "| lexi-0.5 | 3,1 | gpu | 1500.0 | 150.0 | 1.50x |" in s
