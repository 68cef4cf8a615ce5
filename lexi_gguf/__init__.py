"""lexi-gguf: per-layer expert counts (LExI, arXiv 2509.02753) for MoE models in GGUF / llama.cpp."""

__version__ = "0.1.0"


class LexiError(Exception):
    """A user-facing error: the message names the problem and the fix. The CLI prints it, exits 2."""


def read_json(path, fix: str = "") -> dict:
    """A JSON file the user named (a sensitivity table, a plan, a bench result); a missing or malformed
    file is a LexiError naming it, with `fix` appended when given."""
    import json
    from pathlib import Path
    p = Path(path)
    tail = f"; {fix}" if fix else ""
    if not p.exists():
        raise LexiError(f"{p} does not exist{tail}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise LexiError(f"{p} is not valid JSON ({e}){tail}") from None
