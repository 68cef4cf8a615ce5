"""lexi-gguf: per-layer expert counts (LExI, arXiv 2509.02753) for MoE models in GGUF / llama.cpp."""

__version__ = "0.1.0"


class LexiError(Exception):
    """A user-facing error: the message names the problem and the fix. The CLI prints it, exits 2."""
