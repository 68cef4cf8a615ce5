"""Expert prefetch (llama_lexi_set_prefetch): it only asks the OS to read experts ahead, so every output is
bit-identical with it off, on, and switched mid-run; the next-layer guess is really in the graph; and on a
cold file it takes the experts' page faults away (counted)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from lexi_gguf import LexiError
from lexi_gguf.runtime import llama as runtime

GGML_TYPE_F32 = 0
PROMPT = [464, 2068, 7586, 21831, 18045, 625, 262, 16931]
DECODE = [3290, 13, 198, 1212, 318, 257]


def _run(path, mode: str, switch_to: str | None = None) -> np.ndarray:
    """A prompt batch, then token-by-token decode steps (the graph shapes a chat runs)."""
    llm = runtime.load(path, n_ctx=64, logits_all=True, n_threads=2, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                       prefetch=mode)
    assert runtime.prefetch_mode(llm) == mode
    llm.eval(PROMPT)
    for i, t in enumerate(DECODE):
        if switch_to and i == 2:
            runtime.set_prefetch(llm, switch_to)
        llm.eval([t])
    out = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    llm.close()
    return out


@pytest.mark.parametrize("which", ["f32", "q8_0"])
def test_prefetch_leaves_every_output_bit_identical(which, tiny_gguf, converted):
    path = tiny_gguf("olmoe") if which == "f32" else converted
    ref = _run(path, "off")
    for mode in ("chosen", "guess", "guess2"):
        assert np.array_equal(_run(path, mode), ref), mode
    # switched on and off mid-run: the reused one-token graph is rebuilt, outputs stay the same
    assert np.array_equal(_run(path, "off", switch_to="guess"), ref)
    assert np.array_equal(_run(path, "guess", switch_to="off"), ref)


def test_look_ahead_guesses_run_before_the_layer_before_them_computes(tiny_gguf):
    """The guess for MoE layer j is issued from layer j-1 (guess) or j-2 (guess2), right after that
    layer's router and before its expert matmuls, so its reads overlap them: node order, as the
    scheduler runs the graph."""
    import llama_cpp

    from lexi_gguf.runtime.graph import ggml_lib
    lib = ggml_lib()
    order: list[str] = []

    def cb(t, ask, user_data):
        name = lib.ggml_get_name(t).decode()
        if re.match(r"ffn_moe_(prefetch_guess|topk|down)-\d+$", name):
            order.append(name)
        return False if ask else True
    callback = llama_cpp.ggml_backend_sched_eval_callback(cb)
    want = {"off": set(), "chosen": set(), "guess": {1, 2, 3}, "guess2": {1, 2, 3}}
    for mode, layers in want.items():
        order.clear()
        llm = runtime.load(tiny_gguf("olmoe"), n_ctx=32, eval_callback=callback, prefetch=mode)
        llm.eval(PROMPT[3:4])   # one-token decode: every layer runs every row
        llm.close()
        guesses = [n for n in order if "guess" in n]
        assert {int(n.rsplit("-", 1)[1]) for n in guesses} == layers, mode   # nothing guesses layer 0
        for j in layers:
            first = order.index(f"ffn_moe_prefetch_guess-{j}")
            ahead = 2 if mode == "guess2" and j >= 2 else 1
            # issued after layer j-ahead's router, before its experts' down matmul
            assert order.index(f"ffn_moe_topk-{j - ahead}") < first < order.index(f"ffn_moe_down-{j - ahead}"), (mode, j)
        if mode == "guess2":
            assert len(guesses) == 5    # layer 0 guesses 1, 2; layer 1 guesses 2, 3; layer 2 guesses 3


def test_bad_prefetch_modes_are_refused(tiny_gguf):
    with pytest.raises(LexiError, match="unknown prefetch mode 'sometimes'"):
        runtime.load(tiny_gguf("olmoe"), n_ctx=32, prefetch="sometimes")
    llm = runtime.load(tiny_gguf("olmoe"), n_ctx=32)
    with pytest.raises(LexiError, match="unknown prefetch mode 7"):
        runtime.set_prefetch(llm, 7)
    llm.close()


FAULT_SCRIPT = r"""
import ctypes, json, mmap, os, resource, sys
import numpy as np
from lexi_gguf.measure.memlimit import evict, resident_bytes
from lexi_gguf.runtime import llama as runtime
path, mode = sys.argv[1], sys.argv[2]
llm = runtime.load(path, n_ctx=64, n_threads=2, prefetch=mode, use_mmap=True)
toks = [int(t) for t in np.random.default_rng(0).integers(100, 50000, 24)]
llm.eval(toks[:2])
# cold again: unmap the file's pages from llama.cpp's mapping (MADV_DONTNEED keeps the mapping), then
# drop them from the page cache. MADV_RANDOM: no read-around on a fault (this disk reads 8 MiB around
# each one), so each fault is one page and the count says which bytes were not asked for ahead
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
real = os.path.realpath(path)
for line in open("/proc/self/maps"):
    f = line.split()
    if len(f) >= 6 and f[5] == real:
        lo, hi = (int(x, 16) for x in f[0].split("-"))
        assert libc.madvise(lo, hi - lo, 1) == 0     # MADV_RANDOM
        assert libc.madvise(lo, hi - lo, 4) == 0     # MADV_DONTNEED
ev = evict(path)
before = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
for t in toks[2:]:
    llm.eval([t])
majflt = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - before
print("RESULT " + json.dumps({"majflt": majflt, "size": os.path.getsize(path), "resident_after_evict":
      ev["resident_after"], "logits": [float(x) for x in llm.scores[llm.n_tokens - 1][:64]]}))
"""


def test_prefetch_turns_expert_page_faults_into_reads_ahead(expert_heavy_gguf):
    """Counts, not time: after the file's pages are dropped, decoding 22 tokens with prefetch on takes
    far fewer major page faults than with it off (each expert's bytes were asked for before the matmul
    touched them), and the logits are the same. A prefetch op that did nothing would fail this.
    Measured here (AVX2 EPYC, ext4): 15121 faults off, 6584 chosen and guess (the rest: the output
    matrix and attention, which are not prefetched)."""
    import json
    import subprocess
    import sys
    got = {}
    for mode in ("off", "chosen", "guess"):
        r = subprocess.run([sys.executable, "-c", FAULT_SCRIPT, str(expert_heavy_gguf), mode],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        got[mode] = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[7:])
    off = got["off"]
    assert off["resident_after_evict"] < 0.1 * off["size"], "the file's pages were not dropped: no cold start"
    assert off["majflt"] >= 100, off["majflt"]          # the experts really were faulted in from the file
    for mode in ("chosen", "guess"):
        assert got[mode]["majflt"] < 0.6 * off["majflt"], (mode, got[mode]["majflt"], off["majflt"])
        assert got[mode]["logits"] == off["logits"], mode
