"""Every CPU class runs quantized models in batches (issue 8).

ggml picks its matmul kernels by CPU class and batch size: batch 1 takes the vec-dot path, batches of
16+ take the repack GEMM (AVX2/AVX512) or, on AMX CPUs when compiled in, the AMX path that crashes.
So: quantized (Q8_0, Q4_0) models with per-layer k, evaluated in batches of >= 32 tokens through
llama-cpp-python, llama-bench and llama-perplexity, each in a child process so a crash fails the test
with the signal named instead of killing pytest. Plus: the AMX matmul path is not compiled in, checked
on the built library and on ggml's own source compiled for an AMX CPU.
"""
from __future__ import annotations

import json
import platform
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from lexi_gguf.runtime import build, cpu, llama as runtime
from lexi_gguf.export.convert import quantize
from lexi_gguf.measure.evaluate import perplexity_from_output
from lexi_gguf.gguf.writer import copy_with_metadata, lexi_metadata
from lexi_gguf.gguf.reader import model_info
from lexi_gguf.runtime.procs import ChildFailed, exit_cause, run_child
from lexi_gguf.export.hf_to_gguf import convert_to_gguf
from lexi_gguf.testbeds.tinymodels import make_checkpoint

QUANTS = ["Q8_0", "Q4_0"]
COUNTS = [2, 4, 1, 3]          # per-layer k, layer 0 below base 4
BATCH = 64


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, llama_cpp_dir):
    """OLMoE-shaped tiny model wide enough (hidden 256, expert ffn 256) for every quantized GEMM path."""
    work = tmp_path_factory.mktemp("cpu-paths")
    hf = make_checkpoint("olmoe", work / "hf", llama_cpp_dir, seed=3, hidden_size=256, intermediate_size=256,
                         num_attention_heads=4, num_key_value_heads=4)
    f16 = convert_to_gguf(hf, work / "f16.gguf", llama_cpp_dir, outtype="f16")
    keyed = copy_with_metadata(f16, work / "keyed.gguf", lexi_metadata(model_info(f16), COUNTS, "manual"), progress=False)
    out = {}
    for q in QUANTS:
        out[q] = work / f"olmoe-{q}.gguf"
        quantize(keyed, out[q], q, threads=2)
    return out


# a child that evaluates BATCH tokens in one batch, then the same tokens one at a time (the vec-dot path)
CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from lexi_gguf.runtime import llama as runtime
    path, batch = sys.argv[1], int(sys.argv[2])
    toks = [(i * 7919) % 50000 + 100 for i in range(batch)]
    llm = runtime.load(path, n_ctx=2 * batch, n_batch=batch, n_threads=2, logits_all=True)
    llm.eval(toks)
    batched = np.array(llm.scores[batch - 1], dtype=np.float64)
    llm.reset()
    for t in toks:
        llm.eval([t])
    single = np.array(llm.scores[batch - 1], dtype=np.float64)
    cos = float(batched @ single / np.linalg.norm(batched) / np.linalg.norm(single))
    print(json.dumps({"finite": bool(np.isfinite(batched).all()), "cos": cos}))
""")


@pytest.mark.parametrize("quant", QUANTS)
def test_llama_cpp_python_batched(quantized, quant):
    r = run_child([sys.executable, "-c", CHILD, quantized[quant], BATCH], f"llama-cpp-python {quant} batch {BATCH}",
                  timeout=300)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["finite"]
    # the batched GEMM and the batch-1 vec-dot path compute the same layer (same q8 activations)
    assert res["cos"] > 0.999, res


@pytest.mark.parametrize("quant", QUANTS)
def test_llama_bench_batched(quantized, quant):
    r = run_child([runtime.tool("llama-bench"), "-m", quantized[quant], "-p", BATCH, "-n", 4, "-b", BATCH,
                   "-ub", 32, "-t", 2, "-r", 1, "-o", "json"], f"llama-bench {quant}", timeout=300)
    rows = json.loads(r.stdout)
    # both tests ran: the batched prefill this file is about, and the decode
    assert sorted((row["n_prompt"], row["n_gen"]) for row in rows) == [(0, 4), (int(BATCH), 0)]


@pytest.mark.parametrize("quant", QUANTS)
def test_llama_perplexity_batched(quantized, quant, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"The value of item {i} is {i * 3 % 17}, and the next one follows." for i in range(120)))
    r = run_child([runtime.tool("llama-perplexity"), "-m", quantized[quant], "-f", text, "-c", BATCH, "-b", BATCH,
                   "--chunks", 2, "-t", 2], f"llama-perplexity {quant}", timeout=300)
    ppl = perplexity_from_output(r.stdout + r.stderr)
    assert 1.0 < ppl < 1e6


def test_child_crash_names_the_signal():
    # what a kernel crash looks like to the tests above: a failure naming the signal, pytest survives
    with pytest.raises(ChildFailed) as e:
        run_child([sys.executable, "-c", "import os, signal; print('before'); os.kill(os.getpid(), signal.SIGSEGV)"],
                  "crashing child")
    assert e.value.returncode == -signal.SIGSEGV
    assert "SIGSEGV" in str(e.value) and "before" in str(e.value)
    assert exit_cause(-signal.SIGILL) == "killed by SIGILL (signal 4)"
    assert exit_cause(3) == "exit status 3"


def test_amx_matmul_not_in_the_built_runtime():
    rec = runtime.runtime_record()
    assert rec and rec["cmake_args"] == build.cmake_args(rec["backend"])
    assert not cpu.amx_matmul_compiled(), "ggml reports AMX_INT8: the AMX matmul path is compiled in"
    if not shutil.which("nm"):
        pytest.skip("nm (binutils) not installed")
    import llama_cpp
    from pathlib import Path
    libs = list((Path(llama_cpp.__file__).parent / "lib").glob("libggml-cpu*"))
    assert libs, "no libggml-cpu in the installed llama_cpp"
    for binary in [*libs, runtime.tool("llama-bench"), runtime.tool("llama-perplexity")]:
        syms = subprocess.run(["nm", "-C", "--defined-only", *(["-D"] if binary.suffix == ".so" else []), binary],
                              capture_output=True, text=True).stdout
        assert "ggml_backend_amx_buffer_type" not in syms, f"{binary} has the AMX buffer type"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the AMX path exists only on x86-64")
def test_build_flags_remove_amx_path_for_an_amx_cpu(llama_cpp_dir, tmp_path):
    """This machine may lack AMX, so compile ggml's AMX source as -march=native would on a Sapphire
    Rapids CPU: without our flags it defines the AMX buffer type, with them it does not."""
    src = llama_cpp_dir / "ggml" / "src" / "ggml-cpu" / "amx" / "amx.cpp"
    inc = [f"-I{llama_cpp_dir / d}" for d in ("ggml/include", "ggml/src", "ggml/src/ggml-cpu")]

    def amx_symbols(extra: list[str]) -> bool:
        obj = tmp_path / "amx.o"
        subprocess.run(["g++", "-std=c++17", "-O0", "-march=sapphirerapids", *extra, *inc, "-c", src, "-o", obj],
                       check=True, capture_output=True)
        syms = subprocess.run(["nm", "-C", "--defined-only", obj], capture_output=True, text=True).stdout
        return "ggml_backend_amx_buffer_type" in syms

    if not (shutil.which("g++") and shutil.which("nm")):
        pytest.skip("g++ and nm are needed to compile ggml's AMX source")
    assert amx_symbols([]), "control: ggml's AMX path should compile in for an AMX target"
    assert not amx_symbols([build.NO_AMX_FLAGS]), "the runtime's build flags leave the AMX path in"
