"""A bench model with trained routing and experts as large as needed: every expert of a trained
built-in model widened with zeros (issue 19). Bench-only (bench_memlimit.py --widen-testbed): it was
lexi_gguf.testbeds.widen until issue 34 moved what only the benches use out of the package.

gate and up get zero rows and down gets zero columns, so the extra hidden units compute
silu(0) * 0 = 0 and add nothing: the outputs, and so the routing, are those of the trained model
(bit-identical for Q8_0, whose block dot products are integer sums; F32 / F16 to summation order),
while each expert grows by the factor to MBs. Where a random-weight bench model routes stickily (66-93 % of a layer's
experts shared between consecutive tokens), this one routes as its training taught it.
Q8_0 / F16 / F32 expert tensors (zero bytes are zero blocks in all three).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lexi_gguf import LexiError
from lexi_gguf.gguf.reader import field_value, open_one

EXPERT_IN = ("ffn_gate_exps", "ffn_up_exps")      # [n_embd, n_ff, n_expert]: rows are hidden units
EXPERT_OUT = ("ffn_down_exps",)                    # [n_ff, n_embd, n_expert]: columns are hidden units
WIDENABLE = ("Q8_0", "F16", "F32")


def widen_experts(src: str | Path, out: str | Path, factor: int, *, force: bool = False, progress: bool = True) -> Path:
    """Write `out`: src with every routed expert's hidden width times `factor` (zeros)."""
    import gguf

    from lexi_gguf.gguf.writer import copy_with_metadata
    if factor < 1:
        raise LexiError(f"widen factor {factor}: give an integer >= 1")
    r = open_one(src)
    arch = field_value(r, "general.architecture")
    key = next((k for k in (f"{arch}.expert_feed_forward_length", f"{arch}.feed_forward_length")
                if field_value(r, k) is not None), None)
    if key is None:
        raise LexiError(f"{src} states no expert feed-forward length ({arch}.expert_feed_forward_length)")
    n_ff = int(field_value(r, key))
    for t in r.tensors:
        if t.name.split(".")[-2] in EXPERT_IN + EXPERT_OUT and t.tensor_type.name not in WIDENABLE:
            raise LexiError(f"{t.name} is {t.tensor_type.name}: widening works on {', '.join(WIDENABLE)} experts "
                            "(requantize after widening)")

    def data(t):
        kind = t.name.split(".")[-2]
        d = np.asarray(t.data)
        if kind in EXPERT_IN:        # (n_expert, n_ff, row): append zero rows
            return np.concatenate([d, np.zeros((d.shape[0], d.shape[1] * (factor - 1), d.shape[2]), d.dtype)], axis=1)
        if kind in EXPERT_OUT:       # (n_expert, n_embd, row of n_ff): append zero blocks to every row
            return np.concatenate([d, np.zeros((*d.shape[:2], d.shape[2] * (factor - 1)), d.dtype)], axis=2)
        return t.data
    new = {key: (n_ff * factor, gguf.GGUFValueType.UINT32, None)}
    return copy_with_metadata(src, out, new, force=force, drop_prefix="\0", progress=progress, tensor_data=data)
