"""bench/widen.py (bench-only; was testbeds.widen): experts widened with zeros compute the same model
(Q8_0: logits bit-identical; f32: to summation order), store the new width, and grow by the factor; quant
types it cannot widen are refused."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from lexi_gguf import LexiError
from lexi_gguf.gguf.reader import field_value, open_one

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # the checkout root: bench/ helpers
from bench.widen import widen_experts  # noqa: E402
from conftest import f32_logits  # noqa: E402


@pytest.mark.parametrize("which", ["q8_0", "f32"])
def test_widened_experts_compute_the_same_model(which, converted, tiny_gguf, tmp_path):
    src = converted if which == "q8_0" else tiny_gguf("qwen3_moe")
    out = widen_experts(src, tmp_path / "wide.gguf", 4, progress=False)
    a, b = open_one(src), open_one(out)
    arch = field_value(a, "general.architecture")
    key = next(k for k in (f"{arch}.expert_feed_forward_length", f"{arch}.feed_forward_length") if field_value(a, k))
    assert field_value(b, key) == 4 * field_value(a, key)
    exp = {t.name: int(t.n_bytes) for t in a.tensors if "_exps" in t.name}
    wide = {t.name: int(t.n_bytes) for t in b.tensors if "_exps" in t.name}
    assert exp and all(wide[n] == 4 * exp[n] for n in exp)
    x, y = f32_logits(src), f32_logits(out)
    if which == "q8_0":
        assert np.array_equal(x, y)          # integer block dot products: zero blocks add exact zeros
    else:                                    # f32: longer SIMD sums, other rounding order
        assert np.abs(x - y).max() <= 1e-5 * np.abs(x).max() and (x.argmax(1) == y.argmax(1)).all()


def test_quant_types_it_cannot_widen_are_refused(converted, tmp_path):
    from lexi_gguf.export.convert import quantize
    q4 = tmp_path / "q4.gguf"
    quantize(converted, q4, "Q4_0", allow_requantize=True)
    with pytest.raises(LexiError, match="widening works on Q8_0, F16, F32 experts"):
        widen_experts(q4, tmp_path / "wide.gguf", 2, progress=False)
    assert not (tmp_path / "wide.gguf").exists()
