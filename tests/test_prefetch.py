"""Expert prefetch (llama_lexi_set_prefetch): it only asks the OS to read experts ahead, so every output is
bit-identical with it off, on, and switched mid-run; the next-layer guess is really in the graph."""
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
    for mode in ("chosen", "guess"):
        assert np.array_equal(_run(path, mode), ref), mode
    # switched on and off mid-run: the reused one-token graph is rebuilt, outputs stay the same
    assert np.array_equal(_run(path, "off", switch_to="guess"), ref)
    assert np.array_equal(_run(path, "guess", switch_to="off"), ref)


def test_next_layer_guess_is_in_the_graph(tiny_gguf):
    import llama_cpp

    from lexi_gguf.runtime.graph import ggml_lib
    lib = ggml_lib()
    seen: set[str] = set()

    def cb(t, ask, user_data):
        name = lib.ggml_get_name(t).decode()
        if re.match(r"ffn_moe_(prefetch_guess|topk)-\d+$", name):
            seen.add(name)
        return False if ask else True
    callback = llama_cpp.ggml_backend_sched_eval_callback(cb)
    for mode, want in (("off", set()), ("chosen", set()), ("guess", {f"ffn_moe_prefetch_guess-{i}" for i in (1, 2, 3)})):
        seen.clear()
        llm = runtime.load(tiny_gguf("olmoe"), n_ctx=32, eval_callback=callback, prefetch=mode)
        llm.eval(PROMPT[:3])
        llm.eval(PROMPT[3:4])   # one-token decode: the last layer too (a prompt's last layer runs output rows only)
        llm.close()
        assert {s for s in seen if "guess" in s} == want, mode    # layer 0 has no earlier MoE input
        assert "ffn_moe_topk-0" in seen


def test_bad_prefetch_modes_are_refused(tiny_gguf):
    with pytest.raises(LexiError, match="unknown prefetch mode 'sometimes'"):
        runtime.load(tiny_gguf("olmoe"), n_ctx=32, prefetch="sometimes")
    llm = runtime.load(tiny_gguf("olmoe"), n_ctx=32)
    with pytest.raises(LexiError, match="unknown prefetch mode 7"):
        runtime.set_prefetch(llm, 7)
    llm.close()
