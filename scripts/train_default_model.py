#!/usr/bin/env python3
"""Train (or find cached) a built-in MoE model: `python scripts/train_default_model.py [NAME]`, NAME one of
default (the default), caching, qwen3-testbed, olmoe-testbed."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lexi_gguf.testbeds.builtin import ensure_default_model  # noqa: E402

if __name__ == "__main__":
    print(ensure_default_model(name=sys.argv[1] if len(sys.argv) > 1 else "default"))
