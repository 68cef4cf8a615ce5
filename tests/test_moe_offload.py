"""Per-layer k with llama.cpp's MoE placement options (runtime.moeplace): --n-cpu-moe N and -ot
PATTERN=BUFFER, on the CPU build. Every weight already lives on the CPU here, so the options move
nothing, but they take llama.cpp's buffer-override path (the loader says which tensors it overrode):
the split placement must run the same per-layer counts (the graph's ffn_moe_topk shapes), select the
same experts and give the same logits as the plain load. CUDA: bench/gpu_check.sh."""
from __future__ import annotations

import re

import numpy as np
import pytest

from lexi_gguf import LexiError, cli
from lexi_gguf.runtime import llama as runtime
from lexi_gguf.runtime.options import LoadOptions

from conftest import LADDER, LADDER_DEFAULT, TOKENS

PLACEMENTS = {"plain": LoadOptions(), "ot exps=CPU": LoadOptions(override_tensor=("exps=CPU",)),
              "n-cpu-moe 99": LoadOptions(n_gpu_layers=99, cpu_moe=99),
              "split (n-cpu-moe 2)": LoadOptions(n_gpu_layers=99, cpu_moe=2)}


def run(path, opts: LoadOptions, kv=None):
    """Logits of every token (f32 KV cache) and the loader's list of overridden tensors."""
    llm = runtime.load(path, options=opts, kv_overrides=kv, n_ctx=64, logits_all=True, n_threads=2,
                       type_k=0, type_v=0)
    overridden = re.findall(r"tensor (\S+) \(.*buffer type overridden to (\S+)", runtime.captured_log())
    counts = runtime.n_expert_active(llm)
    llm.eval(TOKENS)
    out = np.array(llm.scores[: len(TOKENS)], dtype=np.float32)
    llm.close()
    return out, counts, overridden


def test_placement_options_keep_per_layer_counts_and_logits(laddered_gguf):
    from lexi_gguf.runtime.trace import record
    base = {}
    for name, opts in PLACEMENTS.items():
        for budget, kv, want in (("default", None, LADDER_DEFAULT),
                                 ("0.5", runtime.lexi_overrides(budget_index=2), LADDER[0.5])):
            logits, counts, overridden = run(laddered_gguf, opts, kv)
            assert counts == want, (name, budget)
            layers = sorted({int(re.match(r"blk\.(\d+)\.", t).group(1)) for t, _ in overridden})
            assert {t.split(".")[2] for t, _ in overridden} <= {"ffn_up_exps", "ffn_down_exps", "ffn_gate_exps"}
            assert layers == {"plain": [], "ot exps=CPU": [0, 1, 2, 3], "n-cpu-moe 99": [0, 1, 2, 3],
                              "split (n-cpu-moe 2)": [0, 1]}[name], (name, overridden)
            tr = record(laddered_gguf, tokens=[TOKENS], budget=None if budget == "default" else budget,
                        options=opts, progress=False)
            width = (tr.experts >= 0).sum(axis=2)                     # [token, layer]: each ffn_moe_topk's k
            assert (width == np.array(want)).all(), (name, budget, width)
            if name == "plain":
                base[budget] = (logits, tr.experts)
                continue
            np.testing.assert_array_equal(logits, base[budget][0], err_msg=f"{name} at {budget}")
            np.testing.assert_array_equal(tr.experts, base[budget][1], err_msg=f"{name} at {budget}")


def test_placement_options_refused_clearly_or_passed_to_the_tools(laddered_gguf):
    for bad, why in (({"override_tensor": ("exps",)}, "give PATTERN=BUFFER"),
                     ({"override_tensor": ("(exps=CPU",)}, "is not a regular expression"),
                     ({"cpu_moe": -1}, "give a number of layers >= 0")):
        with pytest.raises(LexiError, match=re.escape(why)):
            LoadOptions(**bad)
    with pytest.raises(LexiError, match=r"no buffer type 'CUDA0'; it has .*CPU"):
        runtime.load(laddered_gguf, options=LoadOptions(override_tensor=("exps=CUDA0",)), n_ctx=32)
    args = cli.build_parser().parse_args(["chat", "m.gguf", "-ngl", "99", "--n-cpu-moe", "3", "-ot", "exps=CPU",
                                          "--override-tensor", "attn=CPU"])
    from lexi_gguf.cli.common import load_options
    opts = load_options(args)
    assert opts.cpu_moe == 3 and opts.override_tensor == ("exps=CPU", "attn=CPU")
    assert opts.tool_args() == ["-ngl", "99", "-ot", "exps=CPU", "-ot", "attn=CPU", "--n-cpu-moe", "3"]
