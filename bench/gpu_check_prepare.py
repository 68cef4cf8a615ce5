"""Prepare the one-command CUDA check (bench/gpu_check.sh, docs/backends.md): everything it carries to a
lent GPU machine, made here.

    python bench/gpu_check_prepare.py            # writes out/gpu-check/ (~10 MiB)

out/gpu-check/ then holds
* llama.cpp.tar.gz: the patched llama.cpp of the runtime in use (patches/pin.toml applied), trimmed to
  what a CUDA or CPU build of libllama, llama-bench, llama-perplexity and lexi-fidelity needs: the other
  ggml backends, models, docs, tests, examples, the web UI and every other tool left out; tools/ holds
  only those three; llama-bench also takes `--override-kv` here (one edit to the carried copy, so that one
  file runs full, uniform and LExI) and lexi-fidelity is bench/gpu_check/lexi-fidelity.cpp;
* model.gguf: the built-in default model at Q8_0 with its ladder 1 / 0.75 / 0.5 (bench/models.py);
* ref-<config>.bin: that model's logits for one fixed token sequence (a 48-token batch, then 8 single
  steps) per configuration, computed by the project's own runtime on this CPU (f32 KV cache);
* configs.tsv: per configuration its label, --override-kv arguments, the per-layer counts it must run
  and its reference file; manifest.json: where it all came from.

Nothing here needs a GPU; `make gpu-check-prepare` also builds the trimmed tree for the CPU and runs
gpu_check.sh --cpu on it (tests/test_gpu_check.py checks the layout and sizes of what is written).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tarfile
from pathlib import Path

if __package__ in (None, ""):          # run as a file: python bench/gpu_check_prepare.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _common as C

HERE = Path(__file__).resolve().parent / "gpu_check"
DEFAULT_OUT = C.ROOT / "out" / "gpu-check"
CARRY_LIMIT = 64 << 20                 # what a run may take along, the working tree included
PACK_LIMIT = 40 << 20                  # what this folder may use of it
N_PROMPT, N_GEN = 48, 8

# what of llama.cpp the trimmed tree keeps (paths relative to vendor/llama.cpp)
KEEP = ["CMakeLists.txt", "LICENSE", "cmake", "include", "src", "common", "vendor", "licenses",
        "ggml/CMakeLists.txt", "ggml/cmake", "ggml/include", "ggml/src/ggml-cpu", "ggml/src/ggml-cuda",
        "tools/llama-bench", "tools/perplexity"]
GGML_SRC_FILES = (".c", ".cpp", ".h", ".in", ".txt")     # ggml/src/*: the core, not the backend folders
TOOLS_CMAKE = """# lexi-gguf gpu_check: the tools this trimmed tree builds (bench/gpu_check_prepare.py)
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(llama-bench)
add_subdirectory(perplexity)
add_subdirectory(lexi-fidelity)
"""
FIDELITY_CMAKE = """set(TARGET lexi-fidelity)
add_executable(${TARGET} lexi-fidelity.cpp)
target_link_libraries(${TARGET} PRIVATE llama-common llama ${CMAKE_THREAD_LIBS_INIT})
target_compile_features(${TARGET} PRIVATE cxx_std_17)
"""

# llama-bench --override-kv KEY=TYPE:VALUE (the carried copy only: the runtime's llama-bench is untouched).
# Each edit is (anchor, replacement): an anchor the pinned file lacks fails the preparation, so a version
# bump that moves llama-bench's code is noticed here, not on the GPU machine.
BENCH_EDITS = [
    ("struct cmd_params {",
     "static std::vector<llama_model_kv_override> lexi_kv_overrides;   // lexi-gguf gpu_check: --override-kv\n\n"
     "struct cmd_params {"),
    ("        mparams.use_extra_bufts = repack;\n",
     "        mparams.use_extra_bufts = repack;\n"
     "        if (!lexi_kv_overrides.empty()) {\n"
     "            if (lexi_kv_overrides.back().key[0] != 0) { lexi_kv_overrides.emplace_back(); lexi_kv_overrides.back().key[0] = 0; }\n"
     "            mparams.kv_overrides = lexi_kv_overrides.data();\n"
     "        }\n"),
    ("            } else if (arg == \"-ncmoe\" || arg == \"--n-cpu-moe\") {",
     "            } else if (arg == \"-ov\" || arg == \"--override-kv\") {\n"
     "                if (++i >= argc || !string_parse_kv_override(argv[i], lexi_kv_overrides)) {\n"
     "                    invalid_param = true;\n"
     "                    break;\n"
     "                }\n"
     "            } else if (arg == \"-ncmoe\" || arg == \"--n-cpu-moe\") {"),
]


def edit_llama_bench(path: Path) -> None:
    text = path.read_text()
    for anchor, new in BENCH_EDITS:
        if text.count(anchor) != 1:
            raise SystemExit(f"gpu_check_prepare: {path.name} has {text.count(anchor)} copies of {anchor.strip()!r} "
                             "(expected 1): the pinned llama-bench changed; update BENCH_EDITS")
        text = text.replace(anchor, new)
    path.write_text(text)


def trim(src: Path, dst: Path) -> None:
    """Copy the kept parts of the patched llama.cpp tree src to dst (replaced)."""
    if dst.exists():
        shutil.rmtree(dst)
    ignore = shutil.ignore_patterns(".git*", "*.o", "__pycache__")
    for rel in KEEP:
        s, d = src / rel, dst / rel
        if not s.exists():
            raise SystemExit(f"gpu_check_prepare: {s} is missing from the patched tree")
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(s, d, ignore=ignore) if s.is_dir() else shutil.copy2(s, d)
    for f in (src / "ggml" / "src").iterdir():
        if f.is_file() and f.name.endswith(GGML_SRC_FILES):
            shutil.copy2(f, dst / "ggml" / "src" / f.name)
    (dst / "tools" / "CMakeLists.txt").write_text(TOOLS_CMAKE)
    fid = dst / "tools" / "lexi-fidelity"
    fid.mkdir(parents=True)
    shutil.copy2(HERE / "lexi-fidelity.cpp", fid / "lexi-fidelity.cpp")
    (fid / "CMakeLists.txt").write_text(FIDELITY_CMAKE)
    edit_llama_bench(dst / "tools" / "llama-bench" / "llama-bench.cpp")


def pack(tree: Path, out: Path) -> None:
    with tarfile.open(out, "w:gz", compresslevel=9) as tf:
        tf.add(tree, arcname="llama.cpp")


def reference(model: Path, kv: dict, tokens: list[int], out: Path, threads: int) -> list[int]:
    """The model's logits for tokens (the prompt as one batch, then single steps, as lexi-fidelity runs
    them) through the project's runtime; writes the LEXIFID1 file; returns the counts it ran."""
    import numpy as np

    from lexi_gguf.runtime import llama as runtime
    llm = runtime.load(model, kv_overrides=kv or None, n_ctx=len(tokens) + 16, n_batch=N_PROMPT, logits_all=True,
                       n_threads=threads, type_k=0, type_v=0)     # GGML_TYPE_F32 KV cache, as lexi-fidelity
    counts = runtime.n_expert_active(llm)
    llm.eval(tokens[:N_PROMPT])
    for t in tokens[N_PROMPT:]:
        llm.eval([t])
    logits = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    n_vocab = llm.n_vocab()
    llm.close()
    with open(out, "wb") as f:
        f.write(b"LEXIFID1")
        np.array([N_PROMPT, N_GEN, n_vocab], dtype=np.int32).tofile(f)
        np.array(tokens, dtype=np.int32).tofile(f)
        logits.tofile(f)
    return counts


def read_reference(path: Path):
    """The logits of a LEXIFID1 file, [tokens, n_vocab] float32."""
    import numpy as np
    raw = path.read_bytes()
    n_prompt, n_gen, n_vocab = np.frombuffer(raw, np.int32, 3, 8)
    n = int(n_prompt + n_gen)
    return np.frombuffer(raw, np.float32, n * int(n_vocab), 8 + 12 + 4 * n).reshape(n, int(n_vocab))


def mean_kl(p_logits, q_logits) -> float:
    """Mean over tokens of KL(p || q) of the softmaxed logits, in nats."""
    import numpy as np

    def logsoftmax(x):
        x = x.astype(np.float64) - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    lp, lq = logsoftmax(p_logits), logsoftmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())


def kl_bound(row: dict, rows: list[dict], logits: dict) -> float:
    """The largest mean KL a backend's logits may have from this configuration's CPU reference: a tenth of
    the smallest distance from this reference to one at other per-layer counts, so that a backend that
    ran the wrong counts anywhere cannot pass, while summation-order and activation-quantization noise
    (1e-5 nats and below on this model) does."""
    other = [mean_kl(logits[row["label"]], logits[r["label"]]) for r in rows if r["counts"] != row["counts"]]
    return 0.1 * min(other)


def configs(model: Path) -> list[tuple[str, dict]]:
    """full, uniform and LExI at each stored budget below 1, and the file's default: (label, kv)."""
    from lexi_gguf.measure.configs import run_configs
    out = []
    for c in run_configs(model, [0.75, 0.5]):
        out.append((c.label.replace(" ", "-"), c.kv))
    return out + [("default", {})]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where (default {DEFAULT_OUT.relative_to(C.ROOT)})")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import numpy as np

    from bench.models import default_gguf
    from lexi_gguf.runtime.build import read_pin, runtime_record
    from lexi_gguf.runtime.llama import llama_cpp_dir, override_kv_args
    rec = runtime_record() or {}
    pin = read_pin()
    if rec.get("patch_hash") != pin.patch_hash:
        raise SystemExit("gpu_check_prepare: the runtime in use is not built from today's patches; run `make setup`")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("ref-*.bin"), out / "results"]:     # what an earlier preparation or --cpu run left
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    tree = out / "llama.cpp"
    trim(llama_cpp_dir(), tree)
    pack(tree, out / "llama.cpp.tar.gz")
    shutil.rmtree(tree)

    C.WORK.mkdir(parents=True, exist_ok=True)
    model = out / "model.gguf"
    shutil.copy2(default_gguf(C.WORK, args.threads), model)
    from lexi_gguf.runtime import llama as runtime
    llm = runtime.load(model, n_ctx=64)
    n_vocab = llm.n_vocab()
    llm.close()
    tokens = np.random.default_rng(0).integers(100, n_vocab, N_PROMPT + N_GEN).tolist()
    rows, logits = [], {}
    for label, kv in configs(model):
        ref = out / f"ref-{label}.bin"
        counts = [k for k in reference(model, kv, tokens, ref, args.threads) if k > 0]
        logits[label] = read_reference(ref)
        rows.append({"label": label, "kv": kv, "counts": counts, "ref": ref.name})
    lines = []
    for r in rows:
        r["max_kl"] = kl_bound(r, rows, logits)
        ov = " ".join(override_kv_args(r["kv"])) or "-"
        lines.append("\t".join([r["label"], ov, ",".join(map(str, r["counts"])), r["ref"], f"{r['max_kl']:.3g}"]))
    (out / "configs.tsv").write_text("\n".join(lines) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    manifest = {"llama_cpp_commit": pin.llama_cpp_commit, "patch_hash": pin.patch_hash, "version": pin.version,
                "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest(), "n_prompt": N_PROMPT, "n_gen": N_GEN,
                "configs": rows, "bytes": size, "reference_machine": C.machine(),
                "commit": C.git("rev-parse", "--short", "HEAD")}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if size > PACK_LIMIT:
        raise SystemExit(f"gpu_check_prepare: {out} holds {size / 2**20:.1f} MiB, over the {PACK_LIMIT >> 20} MiB "
                         f"it may use of the {CARRY_LIMIT >> 20} MiB a run carries")
    print(f"{out}: {size / 2**20:.1f} MiB ({len(rows)} configurations); on the GPU machine: bash bench/gpu_check.sh "
          "(carry out/gpu-check)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
