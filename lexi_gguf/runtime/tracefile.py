"""The trace file (`.npz`, docs/caching.md): experts per token and MoE layer. Its own module so that what
reads traces (runtime.replay, the caching stage) does not need the recorder."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import LexiError


@dataclass
class Trace:
    """Experts per token and MoE layer, in evaluation order. Arrays are indexed [token, moe layer, slot];
    slots beyond a layer's k hold -1 (experts) and 0 (weights)."""
    tokens: np.ndarray          # int32 [T]
    generated: np.ndarray       # bool [T]: produced by greedy decoding (else prompt/text)
    seq: np.ndarray             # int32 [T]: which prompt or text chunk
    moe_layers: np.ndarray      # int32 [L]: block index of each MoE layer
    counts: np.ndarray          # int32 [L]: experts each MoE layer ran
    experts: np.ndarray         # int16 [T, L, kmax], selection order (highest routing score first)
    weights: np.ndarray         # float32 [T, L, kmax], the weights the runtime applied
    hidden: np.ndarray | None = None   # float16 [T, L, n_embd]: each MoE layer's router input
    meta: dict = field(default_factory=dict)

    @property
    def n_expert(self) -> int:
        return int(self.meta["n_expert"])

    def save(self, path) -> Path:
        from ..gguf.writer import atomic_output
        arrays = {k: getattr(self, k) for k in ("tokens", "generated", "seq", "moe_layers", "counts", "experts", "weights")}
        if self.hidden is not None:
            arrays["hidden"] = self.hidden
        arrays["meta"] = np.frombuffer(json.dumps(self.meta).encode(), dtype=np.uint8)
        with atomic_output(path, force=True) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path) -> "Trace":
        p = Path(path)
        if not p.exists():
            raise LexiError(f"{p} does not exist")
        try:
            z = np.load(p)
            meta = json.loads(bytes(z["meta"]).decode())
            return cls(*(z[k] for k in ("tokens", "generated", "seq", "moe_layers", "counts", "experts", "weights")),
                       hidden=z["hidden"] if "hidden" in z.files else None, meta=meta)
        except (KeyError, ValueError, OSError) as e:
            raise LexiError(f"{p} is not a lexi-gguf trace ({e}); record one with `lexi-gguf trace`") from None
