#!/usr/bin/env python3
"""Train (or find cached) the built-in default MoE model: `python scripts/train_default_model.py`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lexi_gguf.default_model import ensure_default_model  # noqa: E402

if __name__ == "__main__":
    print(ensure_default_model())
